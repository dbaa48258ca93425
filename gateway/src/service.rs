//! The enrollment service: takes request messages off the [`Bus`], decodes
//! them, runs them through the [`Authority`], and publishes the answer on the
//! request's reply topic. Requests are served concurrently, up to a bound;
//! one bad request never stops the others.

use std::sync::Arc;

use idgate_pki::protocol::{
    self, DecodeError, Format, Issued, Op, RejectCode, Rejected, Reply, Topic,
};
use idgate_pki::wire;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info_span, warn};

use crate::authority::{Answer, Authority, Rejection};
use crate::broker::{Bus, Message};
use crate::line::topic::StationTopic;
use crate::registry::now;

/// Requests in progress at once.
const CONCURRENCY: usize = 256;

/// Serves requests until the bus closes or `shutdown` fires, then waits for
/// the requests in progress to be answered.
pub async fn run(
    authority: Arc<Authority>,
    bus: Bus,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let Bus {
        mut requests,
        replies,
    } = bus;
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut in_flight = JoinSet::new();
    loop {
        let message = tokio::select! {
            message = requests.recv() => message,
            _ = shutdown.wait_for(|stop| *stop) => None,
        };
        let Some(message) = message else { break };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let authority = authority.clone();
        let replies = replies.clone();
        in_flight.spawn(async move {
            handle(&authority, message, &replies).await;
            drop(permit);
        });
        // Reap finished tasks so the set does not grow without bound.
        while in_flight.try_join_next().is_some() {}
    }
    while in_flight.join_next().await.is_some() {}
}

/// Serves one message; unknown topics are ignored.
pub async fn handle(authority: &Authority, message: Message, replies: &mpsc::Sender<Message>) {
    if let Some(topic) = StationTopic::parse(&message.topic) {
        if topic.reply.is_none() && topic.op == Op::Enroll {
            station_enroll(authority, &topic, &message.payload, replies).await;
        }
        return;
    }
    let Some(topic) = Topic::parse(&message.topic).filter(|t| t.reply.is_none()) else {
        debug!(topic = %message.topic, "ignoring a message on a non-request topic");
        return;
    };
    let span = info_span!(
        "request",
        device_id = topic.device_id,
        op = topic.op.as_str(),
        rid = tracing::field::Empty,
        serial = tracing::field::Empty
    );
    async {
        let (reply, payload) = match topic.op {
            Op::Enroll => enroll(authority, &topic, &message.payload).await,
            Op::Renew => renew(authority, &topic, &message.payload).await,
            _ => {
                debug!("no handler for this operation");
                return;
            }
        };
        let reply_topic = topic.with_reply(reply).to_string();
        if replies
            .send(Message {
                topic: reply_topic,
                payload,
                retain: false,
            })
            .await
            .is_err()
        {
            warn!("broker gone; reply dropped");
        }
    }
    .instrument(span)
    .await;
}

/// An enrollment relayed by a line station; answered on the station's topic.
async fn station_enroll(
    authority: &Authority,
    topic: &StationTopic<'_>,
    payload: &[u8],
    replies: &mpsc::Sender<Message>,
) {
    let span = info_span!(
        "request",
        station_id = topic.station_id,
        device_id = topic.device_id,
        op = topic.op.as_str(),
        rid = tracing::field::Empty,
        serial = tracing::field::Empty
    );
    async {
        let format = topic.format;
        let (reply, payload) = match wire::decode_enroll(format, payload) {
            Ok(request) => {
                tracing::Span::current().record("rid", request.rid.as_str());
                let outcome = authority
                    .enroll_for_station(topic.station_id, topic.device_id, &request, now())
                    .await;
                answer(format, &request.rid, outcome)
            }
            Err(undecodable) => {
                let device_topic = Topic::request(topic.device_id, topic.op, format);
                refuse_undecodable(authority, &device_topic, undecodable).await
            }
        };
        let reply_topic = topic.with_reply(reply).to_string();
        if replies
            .send(Message {
                topic: reply_topic,
                payload,
                retain: false,
            })
            .await
            .is_err()
        {
            warn!("broker gone; reply dropped");
        }
    }
    .instrument(span)
    .await;
}

async fn enroll(authority: &Authority, topic: &Topic<'_>, payload: &[u8]) -> (Reply, Vec<u8>) {
    let format = topic.format;
    let request = match wire::decode_enroll(format, payload) {
        Ok(request) => request,
        Err(undecodable) => {
            return refuse_undecodable(authority, topic, undecodable).await;
        }
    };
    tracing::Span::current().record("rid", request.rid.as_str());
    let outcome = authority.enroll(topic.device_id, &request, now()).await;
    answer(format, &request.rid, outcome)
}

async fn renew(authority: &Authority, topic: &Topic<'_>, payload: &[u8]) -> (Reply, Vec<u8>) {
    let format = topic.format;
    let request = match wire::decode_renew(format, payload) {
        Ok(request) => request,
        Err(undecodable) => {
            return refuse_undecodable(authority, topic, undecodable).await;
        }
    };
    tracing::Span::current().record("rid", request.rid.as_str());
    let outcome = authority.renew(topic.device_id, &request, now()).await;
    answer(format, &request.rid, outcome)
}

async fn refuse_undecodable(
    authority: &Authority,
    topic: &Topic<'_>,
    undecodable: wire::Undecodable,
) -> (Reply, Vec<u8>) {
    let code = match undecodable.error {
        DecodeError::TooLarge => RejectCode::TooLarge,
        _ => RejectCode::Malformed,
    };
    let rid = undecodable.rid.unwrap_or_default();
    let rejection = Rejection::new(code, undecodable.error.to_string());
    authority
        .audit_undecodable(topic.op.as_str(), topic.device_id, &rid, &rejection, now())
        .await;
    rejected(topic.format, &rid, &rejection)
}

fn answer(format: Format, rid: &str, outcome: Result<Answer, Rejection>) -> (Reply, Vec<u8>) {
    match outcome {
        Ok(answer) => {
            tracing::Span::current().record("serial", answer.certificate.serial.as_str());
            (Reply::Accepted, issued(format, rid, &answer))
        }
        Err(rejection) => rejected(format, rid, &rejection),
    }
}

fn issued(format: Format, rid: &str, answer: &Answer) -> Vec<u8> {
    let mut chain = heapless::Vec::<&[u8], { protocol::MAX_CHAIN }>::new();
    for certificate in answer.chain.iter().take(protocol::MAX_CHAIN) {
        let _ = chain.push(certificate);
    }
    let unsigned = |t: i64| u64::try_from(t).unwrap_or(0);
    wire::encode_issued(
        format,
        &Issued {
            rid,
            certificate: &answer.certificate.der,
            chain,
            serial: &answer.certificate.serial,
            not_before: unsigned(answer.certificate.not_before),
            not_after: unsigned(answer.certificate.not_after),
            time: unsigned(now()),
            renew_after: unsigned(answer.renew_after),
            renew_before: unsigned(answer.renew_before),
        },
    )
}

fn rejected(format: Format, rid: &str, rejection: &Rejection) -> (Reply, Vec<u8>) {
    let payload = wire::encode_rejected(
        format,
        &Rejected {
            rid,
            code: rejection.code.as_str(),
            message: &rejection.message,
        },
    );
    (Reply::Rejected, payload)
}
