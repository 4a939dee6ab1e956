//! Key → partition routing (SPEC §4): FNV-1a 32-bit of the key bytes, modulo the partition count.
//!
//! For keys without a `.` this equals the NATS server's `{{partition(P,1)}}` subject mapping of a
//! subject whose wildcard token is the key, so any client in any language can compute where a
//! keyed task goes.

const FNV_OFFSET_BASIS: u32 = 0x811c_9dc5;
const FNV_PRIME: u32 = 0x0100_0193;

/// FNV-1a, 32-bit, over `bytes`.
pub fn fnv1a32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(FNV_OFFSET_BASIS, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(FNV_PRIME)
    })
}

/// The partition (in `0..partitions`) that owns `key`.
///
/// # Panics
/// Never for a valid queue: `partitions` is validated to be at least 1 by the config layer; a
/// zero is treated as one partition rather than dividing by zero.
pub fn partition_for_key(key: &str, partitions: u32) -> u32 {
    fnv1a32(key.as_bytes()) % partitions.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a32_reference_values() {
        // Published FNV-1a 32 test vectors.
        assert_eq!(fnv1a32(b""), 0x811c_9dc5);
        assert_eq!(fnv1a32(b"a"), 0xe40c_292c);
        assert_eq!(fnv1a32(b"foobar"), 0xbf9c_f968);
    }

    #[test]
    fn partition_is_in_range_and_stable() {
        for p in 1..=128 {
            let part = partition_for_key("customer-42", p);
            assert!(part < p);
            assert_eq!(part, partition_for_key("customer-42", p));
        }
        assert_eq!(partition_for_key("x", 0), 0);
    }
}
