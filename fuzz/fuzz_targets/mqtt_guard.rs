//! The MQTT guard in front of the embedded broker
//! (`idgate_gateway::broker::guard`): every byte comes from an untrusted TLS
//! client, certified or not.
//!
//! Input: byte 0 picks the identity (bit 0) and the protocol level (bit 1:
//! 5, else 4); bytes 1..3 pick a split point; the rest is the client's bytes.
//! They are offered to `admit_connect` as a CONNECT, and to a `Guard` as the
//! stream after CONNECT: at once, in two pieces, and (when short) one byte at a
//! time. How the stream is cut must not change what is forwarded or refused.
#![no_main]

use idgate_gateway::broker::guard::{Guard, Identity, MAX_PACKET, Refusal, admit_connect};
use libfuzzer_sys::fuzz_target;

fn feed_all(identity: &Identity, level: u8, pieces: &[&[u8]]) -> (Vec<u8>, Result<(), Refusal>) {
    let mut guard = Guard::new(identity.clone(), level);
    let mut forward = Vec::new();
    let mut result = Ok(());
    for piece in pieces {
        let r = guard.feed(piece, &mut forward);
        if let Err(refusal) = &r {
            // Refused for good: every later call gives the same refusal and forwards nothing.
            let before = forward.len();
            assert_eq!(guard.feed(b"\xc0\x00", &mut forward), Err(refusal.clone()));
            assert_eq!(forward.len(), before);
            result = r;
            break;
        }
    }
    (forward, result)
}

fuzz_target!(|data: &[u8]| {
    let Some((&control, rest)) = data.split_first() else {
        return;
    };
    let (split, bytes) = match rest {
        [a, b, bytes @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), bytes),
        _ => (0, rest),
    };
    let identity = if control & 4 != 0 {
        Identity::Station("st-a".into())
    } else if control & 1 == 0 {
        Identity::Device("dev-a".into())
    } else {
        Identity::Anonymous
    };
    let level = if control & 2 == 0 { 4 } else { 5 };

    // CONNECT, for every kind of identity.
    for who in [
        Identity::Device("dev-a".into()),
        Identity::Anonymous,
        Identity::Station("st-a".into()),
    ] {
        if let Ok(packet) = admit_connect(&who, bytes) {
            match &who {
                // A device's CONNECT goes on unchanged.
                Identity::Device(_) => assert_eq!(packet, bytes),
                // An anonymous one is rewritten; the rewrite must still be a
                // CONNECT the guard admits (with the prefix added once more).
                Identity::Anonymous => {
                    if packet.len() + 16 <= MAX_PACKET {
                        if let Err(e) = admit_connect(&Identity::Anonymous, &packet) {
                            panic!("rewritten CONNECT is refused: {e:?}\n in:  {bytes:02x?}\n out: {packet:02x?}");
                        }
                    }
                }
                // A station's client id is renamed apart from devices'; the
                // rewrite must still be a well-formed CONNECT without a will.
                Identity::Station(_) => {
                    if packet.len() + 16 <= MAX_PACKET {
                        if let Err(e) = admit_connect(&Identity::Anonymous, &packet) {
                            panic!("renamed station CONNECT is refused: {e:?}\n in:  {bytes:02x?}\n out: {packet:02x?}");
                        }
                    }
                }
            }
        }
    }

    // The stream after CONNECT.
    let whole = feed_all(&identity, level, &[bytes]);
    // Everything forwarded is a prefix of the input, unchanged.
    assert!(bytes.starts_with(&whole.0));
    let cut = split % (bytes.len() + 1);
    let (a, b) = bytes.split_at(cut);
    let pieces = feed_all(&identity, level, &[a, b]);
    assert_eq!(whole, pieces, "split at {cut}");
    if bytes.len() <= 512 {
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        let bytewise = feed_all(&identity, level, &singles);
        assert_eq!(whole, bytewise, "one byte at a time");
    }
});
