//! Containment: a panic or a stuck guest fails only its own work.

use migratory::engine::VmSpec;
use migratory::format::NativeLayout;

use crate::common::{self, MIB};

#[tokio::test]
async fn test_nul_in_vm_id_does_not_stop_the_engine() {
    let e = common::engine(NativeLayout::Kvm, NativeLayout::Kvm).await;
    let r = e.create_vm("src", VmSpec::new("a\u{0}b", 16 * MIB)).await;
    eprintln!("nul id: {r:?}");
    let ok = e.create_vm("src", VmSpec::new("ok", 4 * MIB)).await;
    eprintln!("later: {ok:?}");
    ok.expect("a later VM is created");
}
