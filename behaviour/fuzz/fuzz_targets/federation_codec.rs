#![no_main]
//! Arbitrary bytes as a `/meshwhisper/federation/2` stream, read with the
//! default frame limit until a frame is missing or an error: never panics;
//! every frame re-encodes to exactly the bytes it was read from and decodes
//! back equal; every strict prefix of a frame reads as "not yet" and
//! consumes nothing.
use libfuzzer_sys::fuzz_target;
use meshwhisper_behaviour::federation::codec::{DEFAULT_MAX_FRAME, FederationWire};
use meshwhisper_behaviour_fuzz::check_stream;

fuzz_target!(|data: &[u8]| {
    check_stream::<FederationWire>(DEFAULT_MAX_FRAME, data);
});
