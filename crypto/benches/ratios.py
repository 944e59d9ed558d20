#!/usr/bin/env python3
"""Reads criterion's estimates for the `crypto` bench and prints each
operation as a ratio to the primitives it is made of (markdown)."""
import json, os, sys

root = sys.argv[1] if len(sys.argv) > 1 else "target/criterion"

def ns(name):
    # criterion names the directory after the benchmark id with '/' -> '_'
    d = os.path.join(root, name.replace("/", "_"), "new", "estimates.json")
    with open(d) as f:
        return json.load(f)["median"]["point_estimate"]

P = {k: ns("prim/" + k) for k in [
    "x25519_dh", "x25519_keygen", "aes256gcm_seal_1k", "chacha20poly1305_seal_1k",
    "ed25519_verify", "ed25519_sign", "mlkem768_encaps", "mlkem768_decaps",
    "hmac_sha256_32b", "hkdf_sha256_64b"]}

ops = [
    ("dest_hash", "—", None),
    ("record_sign", "1 Ed25519 sign", P["ed25519_sign"]),
    ("record_verify", "1 Ed25519 verify", P["ed25519_verify"]),
    ("onion_v1_3hop_build_peel", "6 DH + 6 AES-GCM(1 KiB)",
     6 * P["x25519_dh"] + 6 * P["aes256gcm_seal_1k"]),
    ("onion_v2_3hop_build_peel", "6 DH + 6 AES-GCM(1 KiB)",
     6 * P["x25519_dh"] + 6 * P["aes256gcm_seal_1k"]),
    ("pqxdh_both_sides", "8 DH + 1 keygen + ML-KEM encaps + decaps",
     8 * P["x25519_dh"] + P["x25519_keygen"] + P["mlkem768_encaps"] + P["mlkem768_decaps"]),
    ("pqxdh_bundle_verify", "2 Ed25519 verify", 2 * P["ed25519_verify"]),
    ("ratchet_encrypt_decrypt_1k", "2 ChaCha20-Poly1305(1 KiB) + 4 HMAC + 2 HKDF",
     2 * P["chacha20poly1305_seal_1k"] + 4 * P["hmac_sha256_32b"] + 2 * P["hkdf_sha256_64b"]),
]

def fmt(t):
    return f"{t/1000:.2f} µs" if t >= 1000 else f"{t:.0f} ns"

print("| primitive | median |")
print("|---|---|")
for k, v in P.items():
    print(f"| {k} | {fmt(v)} |")
print()
print("| operation | median | made of | primitives sum | ratio |")
print("|---|---|---|---|---|")
for name, parts, base in ops:
    t = ns("op/" + name)
    if base is None:
        print(f"| {name} | {fmt(t)} | {parts} | — | — |")
    else:
        print(f"| {name} | {fmt(t)} | {parts} | {fmt(base)} | {t/base:.2f}× |")
