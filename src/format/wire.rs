//! Values of an enum that a newer peer may extend, as they arrive.
//!
//! # When to use what
//! A type that crosses the wire and whose set of values grows with new builds (an algorithm, a
//! native layout, a compression method) travels as [`Wire<T>`] wherever a peer chooses the
//! value, so that a value this build does not know decodes as [`Wire::Unknown`] instead of
//! failing the whole message. The code that acts on the value converts it once, at the edge
//! ([`Wire::known`]), and refuses an unknown one with an error naming it; past that edge it
//! matches `T` itself, exhaustively, so adding a variant makes the compiler find every place
//! that must handle it. `T` itself keeps rejecting unknown names: configuration, the command
//! line and the HTTP API should.
//!
//! A known value encodes exactly as `T` does, so wrapping a field in `Wire` changes no byte on
//! the wire.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A `T` as a peer named it: one this build knows, or the name of one it does not.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
// Untagged: a known value is `T`'s own encoding, and any other string is kept as it came.
#[serde(untagged)]
pub enum Wire<T> {
    /// A value this build knows.
    Known(T),
    /// The name of a value from a newer build.
    Unknown(String),
}

impl<T> Wire<T> {
    /// The known value, or the name this build does not know.
    pub fn known(self) -> Result<T, String> {
        match self {
            Wire::Known(t) => Ok(t),
            Wire::Unknown(name) => Err(name),
        }
    }
}

impl<T> From<T> for Wire<T> {
    fn from(t: T) -> Self {
        Wire::Known(t)
    }
}

/// The known value's own text, or the unknown name as the peer sent it.
impl<T: fmt::Display> fmt::Display for Wire<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Wire::Known(t) => t.fmt(f),
            Wire::Unknown(name) => f.write_str(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::NativeLayout;

    #[test]
    fn test_known_values_encode_as_the_bare_type() {
        for layout in NativeLayout::ALL {
            let bare = rmp_serde::to_vec_named(&layout).expect("encode");
            let wrapped = rmp_serde::to_vec_named(&Wire::from(layout)).expect("encode");
            assert_eq!(wrapped, bare);
            let back: Wire<NativeLayout> = rmp_serde::from_slice(&bare).expect("decode");
            assert_eq!(back, Wire::Known(layout));
        }
    }

    #[test]
    fn test_unknown_names_decode_and_keep_their_name() {
        let bytes = rmp_serde::to_vec_named("qemu-x86").expect("encode");
        let seen: Wire<NativeLayout> = rmp_serde::from_slice(&bytes).expect("an unknown name decodes");
        assert_eq!(seen, Wire::Unknown("qemu-x86".into()));
        assert_eq!(seen.to_string(), "qemu-x86");
        assert_eq!(seen.known(), Err("qemu-x86".to_string()));
        // The bare type still refuses it.
        assert!(rmp_serde::from_slice::<NativeLayout>(&bytes).is_err());
        // Something that is not a name at all is still malformed.
        let number = rmp_serde::to_vec_named(&7u32).expect("encode");
        assert!(rmp_serde::from_slice::<Wire<NativeLayout>>(&number).is_err());
    }
}
