//! `ngx_http_afr_module`: decides inside nginx, before any body is read, who
//! may reach the gateway — `afr_` API keys in the access phase, exact per-key
//! rate limits in a shared-memory zone, `X-RateLimit-*` on every response of an
//! authenticated request.
//!
//! This file is only the module table and worker start-up; each nginx concern
//! has its own file:
//!
//! - [`conf`]: the directives and the module's configuration;
//! - [`access`]: the access-phase handler;
//! - [`clock`]: nginx's cached clocks;
//! - [`zone`]: the shared-memory counters;
//! - [`reload`]: the per-worker key table and its hot reload;
//! - [`state`]: per-request state (what the access phase decided);
//! - [`filter`]: the header filter (`X-RateLimit-*`);
//! - [`variables`]: `$afr_key_id`, `$afr_status`, …;
//! - [`fleet`]: limits shared across nodes through Redis — `fleet/mod.rs`
//!   (the worker's state and decisions), `fleet/task.rs` (thread-pool tasks),
//!   `fleet/redis_io.rs` (the Redis call on a pool thread),
//!   `fleet/directive.rs` (`afr_fleet`);
//! - [`suspend`]: requests waiting for a fleet lease.
//!
//! Files import each other one way only: `conf` → `fleet`, `reload`, `zone`;
//! `access` → `clock`, `filter`, `fleet`, `reload`, `state`, `suspend`,
//! `variables`, `zone`; `fleet` → `clock`, `suspend`, `zone`; `filter` and
//! `variables` → `state`; `suspend` → `zone`; `clock`, `reload`, `state` and
//! `zone` import none. This file wires them into the module table, which
//! `conf`, `access`, `filter` and `state` name (`AfrModule`) to find their
//! configuration and request context. The decisions themselves live in
//! `afr-core`.

use std::ptr::addr_of;

use ngx::core::Status;
use ngx::ffi::{
    ngx_conf_t, ngx_cycle_t, ngx_http_module_t, ngx_int_t, ngx_module_t, ngx_process, ngx_uint_t,
    NGX_HTTP_MODULE, NGX_PROCESS_SINGLE, NGX_PROCESS_WORKER,
};
use ngx::http::{HttpModule, HttpModuleLocationConf, HttpModuleMainConf};

mod access;
mod clock;
mod conf;
mod filter;
mod fleet;
mod reload;
mod state;
mod suspend;
mod variables;
mod zone;

/// The module's type, carrying its configuration types.
pub(crate) struct AfrModule;

impl HttpModule for AfrModule {
    fn module() -> &'static ngx_module_t {
        // SAFETY: the module table is a static that nginx only writes while
        // loading configuration, never concurrently with this read.
        unsafe { &*addr_of!(ngx_http_afr_module) }
    }

    unsafe extern "C" fn preconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        if variables::add(cf).is_err() {
            return Status::NGX_ERROR.into();
        }
        Status::NGX_OK.into()
    }

    unsafe extern "C" fn postconfiguration(cf: *mut ngx_conf_t) -> ngx_int_t {
        // SAFETY: nginx calls postconfiguration with a valid `cf`.
        let cf = unsafe { &mut *cf };
        if conf::check_complete(cf).is_err()
            || access::register(cf).is_err()
            || filter::register().is_err()
        {
            return Status::NGX_ERROR.into();
        }
        Status::NGX_OK.into()
    }
}

// SAFETY: `MainConf` is what `create_main_conf` allocates for this module.
unsafe impl HttpModuleMainConf for AfrModule {
    type MainConf = conf::MainConf;
}

// SAFETY: `LocConf` is what `create_loc_conf` allocates for this module.
unsafe impl HttpModuleLocationConf for AfrModule {
    type LocationConf = conf::LocConf;
}

static NGX_HTTP_AFR_MODULE_CTX: ngx_http_module_t = ngx_http_module_t {
    preconfiguration: Some(AfrModule::preconfiguration),
    postconfiguration: Some(AfrModule::postconfiguration),
    create_main_conf: Some(AfrModule::create_main_conf),
    init_main_conf: None,
    create_srv_conf: None,
    merge_srv_conf: None,
    create_loc_conf: Some(AfrModule::create_loc_conf),
    merge_loc_conf: Some(AfrModule::merge_loc_conf),
};

ngx::ngx_modules!(ngx_http_afr_module);

/// The nginx module table entry.
#[used]
#[allow(non_upper_case_globals)]
pub static mut ngx_http_afr_module: ngx_module_t = ngx_module_t {
    ctx: addr_of!(NGX_HTTP_AFR_MODULE_CTX) as _,
    // SAFETY: the command table is a static array terminated by an empty entry.
    commands: unsafe { &raw mut conf::COMMANDS[0] },
    type_: NGX_HTTP_MODULE as _,
    init_process: Some(init_process),
    ..ngx_module_t::default()
};

/// Worker start-up: installs the key table (re-reading the keys file if it
/// changed since the configuration was read) and starts the watcher that
/// hot-reloads it.
extern "C" fn init_process(cycle: *mut ngx_cycle_t) -> ngx_int_t {
    // The cache manager and loader run init_process too; only processes that
    // serve requests need keys, and a helper must not start a watcher and
    // parser threads of its own (nginx-acme guards its workers the same way).
    // SAFETY: `ngx_process` is set by nginx before init_process and only
    // read here, on the process's single nginx thread.
    let process = unsafe { ngx_process };
    if process != NGX_PROCESS_WORKER as ngx_uint_t && process != NGX_PROCESS_SINGLE as ngx_uint_t {
        return Status::NGX_OK.into();
    }
    // SAFETY: nginx calls init_process with the worker's valid cycle.
    let cycle = unsafe { &*cycle };
    if let Some(mcf) = AfrModule::main_conf_mut(cycle) {
        // Taken, not cloned: once the first hot reload replaces it, nothing in
        // this worker holds the configuration-time table (~20 MB at 100k keys).
        // The master keeps its own copy for workers it respawns.
        if let (Some(path), Some(table)) = (&mcf.keys_path, mcf.keys.take()) {
            let (table, stamp) = reload::start_table(path, table, mcf.keys_stamp);
            reload::install(table);
            reload::watch(path.clone(), stamp, mcf.reload_interval);
        }
    }
    Status::NGX_OK.into()
}
