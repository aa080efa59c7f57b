//! The keys-file parser (`KeyTable::parse`) on arbitrary text: never a panic;
//! a table it accepts finds every one of its keys by hash.
#![no_main]
use afr_core::keys::KeyTable;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(table) = KeyTable::parse("keys.toml", text) {
        for (i, entry) in table.entries().iter().enumerate() {
            assert_eq!(table.find_hash(&entry.hash), Some(i as u32));
        }
    } else if let Err(e) = KeyTable::parse("keys.toml", text) {
        // The message names the file, as nginx -t prints it.
        assert!(e.to_string().starts_with("keys.toml"), "{e}");
    }
});
