//! Hardware traits (placeholder).
#![no_std]
