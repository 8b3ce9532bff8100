//! The frame decoder on arbitrary bytes: frames are read one after another until
//! the input ends or a frame is refused. Never a panic, never an allocation
//! beyond the limits (a header of at most MAX_HEADER, a payload of at most
//! MAX_PAYLOAD); every frame it accepts is encoded again and decodes to itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use replibox_proto::{read_frame, write_frame, MAX_PAYLOAD};
use std::io::Cursor;

fuzz_target!(|data: &[u8]| {
    let mut r = Cursor::new(data);
    while let Ok(Some(frame)) = read_frame(&mut r) {
        assert!(frame.payload.len() <= MAX_PAYLOAD, "a payload beyond the limit was accepted");
        let mut again = Vec::new();
        write_frame(&mut again, frame.epoch, &frame.msg, &frame.payload).expect("an accepted frame encodes");
        let back = read_frame(&mut Cursor::new(&again)).expect("a frame we encoded decodes").expect("not empty");
        assert_eq!(back, frame, "a frame changed on the way through encode and decode");
    }
});
