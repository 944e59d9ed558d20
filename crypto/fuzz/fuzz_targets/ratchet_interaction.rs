#![no_main]
//! Two ratchet sessions talking over a channel the fuzzer controls: it
//! chooses who sends, and which in-flight message is delivered, dropped,
//! duplicated or corrupted. Every delivered, uncorrupted, first copy of a
//! message within the skip bounds must decrypt to what was sent; nothing
//! else may decrypt; nothing panics.
use libfuzzer_sys::fuzz_target;
use meshwhisper_crypto::primitives::X25519Secret;
use meshwhisper_crypto::ratchet::Session;
use rand_core::SeedableRng;

fuzz_target!(|ops: &[u8]| {
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
    let spk = X25519Secret::generate(&mut rng);
    let sk = [9u8; 32];
    let mut sides = [
        Session::initiator(&mut rng, &sk, &spk.public(), b"ad").expect("a"),
        Session::responder(&sk, spk, b"ad").expect("b"),
    ];
    // (to, ciphertext, plaintext, delivered)
    let mut wire: Vec<(usize, Vec<u8>, Vec<u8>, bool)> = Vec::new();
    let mut bob_heard = false;
    let mut counter = 0u32;
    for op in ops.iter().take(256) {
        let arg = (op >> 3) as usize;
        match op & 0x7 {
            0 | 1 => {
                let from = (op & 1) as usize;
                if from == 1 && !bob_heard {
                    continue;
                }
                counter += 1;
                let pt = counter.to_be_bytes().to_vec();
                let ct = sides[from].encrypt(&pt).expect("encrypt");
                wire.push((1 - from, ct, pt, false));
            }
            2 | 3 => {
                if wire.is_empty() {
                    continue;
                }
                let i = arg % wire.len();
                let (to, ct, pt, delivered) = wire[i].clone();
                let got = sides[to].decrypt(&mut rng, &ct);
                if delivered {
                    assert!(got.is_err(), "duplicate decrypted");
                } else if let Ok(p) = got {
                    assert_eq!(p, pt);
                    wire[i].3 = true;
                    if to == 1 {
                        bob_heard = true;
                    }
                }
            }
            4 => {
                if wire.is_empty() {
                    continue;
                }
                let i = arg % wire.len();
                let (to, mut ct, _, _) = wire[i].clone();
                let pos = (arg * 7) % ct.len();
                ct[pos] ^= 0x5a;
                assert!(sides[to].decrypt(&mut rng, &ct).is_err(), "corrupted message decrypted");
            }
            5 => {
                if !wire.is_empty() {
                    let i = arg % wire.len();
                    wire.remove(i);
                }
            }
            6 => {
                let i = arg % 2;
                let restored = Session::from_bytes(&sides[i].to_bytes()).expect("restore");
                sides[i] = restored;
            }
            _ => {}
        }
    }
});
