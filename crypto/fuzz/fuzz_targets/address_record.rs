#![no_main]
//! Arbitrary bytes as an address record: never panics; whatever decodes
//! re-encodes to the same bytes.
use libfuzzer_sys::fuzz_target;
use meshwhisper_crypto::address_record::AddressRecord;

fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = AddressRecord::decode(data) {
        assert_eq!(rec.encode(), data);
        let _ = rec.check_fresh(u64::from_le_bytes([data[0]; 8]));
    }
});
