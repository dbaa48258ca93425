//! The MQTT topics of a line station: where it publishes the enrollment
//! requests it relays and where the gateway answers them
//! (`docs/protocol.md` section 12.4).

use std::fmt;

use idgate_pki::protocol::{Format, Op, Reply, Topic, check_device_id};

/// Every station topic starts with this.
pub const STATION_PREFIX: &str = "idgate/v1/stations/";

/// The filter the gateway's service subscribes to: every station's requests.
pub const STATION_REQUEST_FILTER: &str = "idgate/v1/stations/+/devices/+/enroll/+";

/// `idgate/v1/stations/{station}/devices/{device}/{op}/{fmt}[/{reply}]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StationTopic<'a> {
    /// The station (syntax checked).
    pub station_id: &'a str,
    /// The device the request is for (syntax checked).
    pub device_id: &'a str,
    /// The operation.
    pub op: Op,
    /// The payload encoding.
    pub format: Format,
    /// `None` for a request, else which reply.
    pub reply: Option<Reply>,
}

impl<'a> StationTopic<'a> {
    /// Parses a station topic; `None` for anything else.
    pub fn parse(topic: &'a str) -> Option<StationTopic<'a>> {
        let rest = topic.strip_prefix(STATION_PREFIX)?;
        let (station_id, rest) = rest.split_once('/')?;
        check_device_id(station_id).ok()?;
        let Topic {
            device_id,
            op,
            format,
            reply,
        } = Topic::parse_levels(rest.strip_prefix("devices/")?)?;
        Some(StationTopic {
            station_id,
            device_id,
            op,
            format,
            reply,
        })
    }

    /// The request topic for `device_id` relayed by `station_id`.
    pub fn request(
        station_id: &'a str,
        device_id: &'a str,
        op: Op,
        format: Format,
    ) -> StationTopic<'a> {
        StationTopic {
            station_id,
            device_id,
            op,
            format,
            reply: None,
        }
    }

    /// The same topic with a reply level.
    pub fn with_reply(self, reply: Reply) -> StationTopic<'a> {
        StationTopic {
            reply: Some(reply),
            ..self
        }
    }
}

impl fmt::Display for StationTopic<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{STATION_PREFIX}{}/devices/{}/{}/{}",
            self.station_id,
            self.device_id,
            self.op.as_str(),
            self.format.as_str()
        )?;
        if let Some(reply) = self.reply {
            write!(f, "/{}", reply.as_str())?;
        }
        Ok(())
    }
}

/// `idgate/v1/stations/{id}/` for a valid station id.
pub fn station_prefix(station_id: &str) -> Option<String> {
    check_device_id(station_id).ok()?;
    Some(format!("{STATION_PREFIX}{station_id}/"))
}

/// The filter a station subscribes to for the replies to its requests.
pub fn station_reply_filter(station_id: &str) -> String {
    format!("{STATION_PREFIX}{station_id}/devices/+/enroll/+/+")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_and_refuse_the_rest() {
        let t = StationTopic::request("line-1", "sensor-1", Op::Enroll, Format::Cbor);
        let text = t.to_string();
        assert_eq!(
            text,
            "idgate/v1/stations/line-1/devices/sensor-1/enroll/cbor"
        );
        assert_eq!(StationTopic::parse(&text), Some(t));
        let reply = t.with_reply(Reply::Rejected).to_string();
        assert_eq!(
            StationTopic::parse(&reply).and_then(|t| t.reply),
            Some(Reply::Rejected)
        );
        for bad in [
            "idgate/v1/stations/line-1/devices/sensor-1/enroll",
            "idgate/v1/stations/line-1/sensor-1/enroll/cbor",
            "idgate/v1/stations/+/devices/sensor-1/enroll/cbor",
            "idgate/v1/stations/line-1/devices/#/enroll/cbor",
            "idgate/v1/stations/line-1/devices/sensor-1/enroll/xml",
            "idgate/v1/stations/line-1/devices/sensor-1/enroll/cbor/accepted/x",
            "idgate/v1/stations/line-1/devices/sensor-1/enroll/cbor/done",
            "idgate/v1/devices/sensor-1/enroll/cbor",
        ] {
            assert_eq!(StationTopic::parse(bad), None, "{bad}");
        }
    }
}
