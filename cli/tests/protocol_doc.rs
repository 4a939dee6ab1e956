//! docs/protocol.md gives client authors key → partition test vectors; they must be what
//! Drover's own function computes, or every client built from the page routes differently.

use drover_shared::partition::{fnv1a32, partition_for_key};

#[test]
fn partition_vectors_in_the_protocol_doc_are_right() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/protocol.md"))
        .expect("docs/protocol.md");
    let mut checked = 0;
    for line in doc.lines() {
        // | `customer-42` | `0xfe68adbe` | 62 | 14 |
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() != 6 || !cells[2].starts_with("`0x") {
            continue;
        }
        // The key is what stands between the first two backticks (empty for ``).
        let rest = cells[1].strip_prefix('`').expect("key in backticks");
        let key = &rest[..rest.find('`').expect("closing backtick")];
        let hash = u32::from_str_radix(cells[2].trim_matches('`').trim_start_matches("0x"), 16)
            .expect("hex hash");
        let p64: u32 = cells[3].parse().expect("mod 64");
        let p16: u32 = cells[4].parse().expect("mod 16");
        assert_eq!(fnv1a32(key.as_bytes()), hash, "hash of {key:?}");
        assert_eq!(partition_for_key(key, 64), p64, "{key:?} mod 64");
        assert_eq!(partition_for_key(key, 16), p16, "{key:?} mod 16");
        checked += 1;
    }
    assert_eq!(
        checked, 6,
        "the vector table of docs/protocol.md changed shape"
    );
}
