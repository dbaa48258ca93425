//! Device agent (placeholder).
#![no_std]
