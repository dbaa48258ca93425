//! Enrollment credentials: what a device proves on its first enrollment. One
//! file per kind; today the one-time token.

pub mod token;
