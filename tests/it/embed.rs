//! EngineHandle driven from a plain multi-threaded tokio runtime, from several tasks at once.

use migratory::engine::{EngineHandle, MigrationRequest, Outcome, VmSpec};
use migratory::format::NativeLayout;

use crate::common::{self, MIB};

fn assert_send_sync<T: Send + Sync + Clone>() {}

#[test]
fn test_handle_is_clone_send_sync() {
    assert_send_sync::<EngineHandle>();
}

#[test]
fn test_handle_works_from_a_multi_thread_runtime() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let e = common::engine(NativeLayout::Kvm, NativeLayout::XenHvm).await;
        let mut tasks = Vec::new();
        for i in 0..4 {
            let e = e.clone();
            // Spawned tasks may run on any worker thread: the handle must not care.
            tasks.push(tokio::spawn(async move {
                let id = format!("t{i}");
                e.create_vm("src", VmSpec::new(id.clone(), 4 * MIB))
                    .await
                    .expect("create");
                e.migrate(MigrationRequest::new(id, "src", "dst"))
                    .await
                    .expect("migrate")
            }));
        }
        for t in tasks {
            let r = t.await.expect("task");
            assert_eq!(r.result, Outcome::Completed, "{:?}", r.error);
            assert!(r.verified);
        }
        assert_eq!(e.list_vms("dst").await.expect("list").len(), 4);
        assert!(e.list_vms("src").await.expect("list").is_empty());
    });
}
