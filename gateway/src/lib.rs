//! The idgate gateway: an online intermediate CA that issues short-lived device
//! certificates to devices enrolling over MQTT, with a registry of every device,
//! certificate and decision.
//!
//! Modules by responsibility: [`authority`] is the one signing pipeline,
//! [`provisioner`] the enrollment credentials, [`registry`] the database,
//! [`broker`] the MQTT front (the only module that imports rumqttd),
//! [`service`] the request loop between them, [`datadir`] the files on disk,
//! [`gateway`] all of them started together.

pub mod admin;
pub mod api;
pub mod authority;
pub mod batch;
pub mod bench;
pub mod broker;
pub mod datadir;
pub mod gateway;
pub mod http;
pub mod line;
pub mod provisioner;
pub mod registry;
pub mod revocation;
pub mod service;
pub mod testing;
pub mod web;
