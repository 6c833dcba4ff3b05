//! `GET /vms`, `POST /vms`, `DELETE /vms/{id}`: the VMs of this host.

use std::sync::atomic::Ordering;

use actix_web::http::StatusCode;
use actix_web::{web, HttpResponse};

use migratory::api;
use migratory::engine::VmSpec;
use migratory::format::check_name;
use migratory::vmm::{Pattern, WorkloadSpec};

use super::{Refusal, State};

pub(super) async fn list_vms(state: web::Data<State>) -> Result<HttpResponse, Refusal> {
    let vms = state.engine.list_vms(&state.host).await?;
    Ok(HttpResponse::Ok().json(vms.iter().map(api::Vm::from).collect::<Vec<_>>()))
}

pub(super) async fn create_vm(
    state: web::Data<State>,
    body: web::Json<api::CreateVm>,
) -> Result<HttpResponse, Refusal> {
    if state.shutting_down.load(Ordering::Acquire) {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("host {} is shutting down: it takes no new VM", state.host),
        ));
    }
    let b = body.into_inner();
    check_name("VM id", &b.id).map_err(|e| Refusal::field("id", e))?;
    let pattern = match b.pattern.as_deref() {
        Some(p) => p
            .parse::<Pattern>()
            .map_err(|e| Refusal::new(StatusCode::BAD_REQUEST, e))?,
        None => Pattern::default(),
    };
    let spec = VmSpec {
        vcpus: b.vcpus,
        workload: WorkloadSpec {
            rate_bytes_per_sec: b.dirty_rate_bytes_per_sec,
            working_set_bytes: b.working_set_bytes,
            pattern,
            ..WorkloadSpec::default()
        },
        ..VmSpec::new(b.id, b.memory_bytes)
    };
    let vm = state.engine.create_vm(&state.host, spec).await?;
    Ok(HttpResponse::Created().json(api::Vm::from(&vm)))
}

pub(super) async fn delete_vm(state: web::Data<State>, id: web::Path<String>) -> Result<HttpResponse, Refusal> {
    check_name("VM id", &id).map_err(|e| Refusal::field("id", e))?;
    state.engine.delete_vm(&state.host, &id).await?;
    Ok(HttpResponse::NoContent().finish())
}
