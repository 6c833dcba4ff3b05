//! Device state as an opaque, named, versioned blob.
//!
//! The common format does not interpret device state: each device model serialises itself and
//! is responsible for reading the versions it has written. The name says which model on the
//! target must load the blob and the version lets that model refuse one it does not understand.

use serde::{Deserialize, Serialize};

/// The saved state of one device.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// Which device this is, e.g. `virtio-net:net0`; unique within a VM.
    pub name: String,
    /// Version of `data`'s layout, owned by the device model.
    pub version: u32,
    /// The device model's own encoding of its state.
    #[serde(with = "super::blob")]
    pub data: Vec<u8>,
}
