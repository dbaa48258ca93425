//! The manufacturing line: the gateway's side of line stations (their topics
//! and what a station may enroll) and the station program itself, `idgate
//! line`, which drives devices on their serial ports with the link protocol of
//! `idgate_pki::link` and relays their enrollments over MQTT with its own
//! station certificate.

pub mod topic;

pub mod admin;
pub mod cli;
pub mod relay;
pub mod serial;
pub mod station;
pub mod tokens;
