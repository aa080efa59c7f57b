//! Directives, in the style of `limit_req_zone` / `limit_req`:
//!
//! ```nginx
//! afr_keys            /etc/afr/keys.toml;   # http; parsed now, so `nginx -t` checks it
//! afr_zone            afr:10m;              # http; shared-memory counters
//! afr_reload_interval 1s;                   # http; how often workers stat the keys file
//! afr                 on;                   # http, server, location
//! afr_upstream_secret "s3cret";             # http, server, location; sent as X-Afr-Secret
//! afr_fleet redis://10.0.0.5:6379 nodes=3;  # http; one limit across nodes (fleet/)
//! ```

use std::ffi::{c_char, c_void};
use std::path::PathBuf;
use std::ptr;
use std::sync::Arc;
use std::time::Duration;

use afr_core::keys::KeyTable;
use ngx::core::{Pool, NGX_CONF_ERROR, NGX_CONF_OK};
use ngx::ffi::{
    ngx_command_t, ngx_conf_full_name, ngx_conf_t, ngx_parse_size, ngx_parse_time,
    ngx_shared_memory_add, ngx_shm_zone_t, ngx_str_t, ngx_uint_t, NGX_CONF_1MORE, NGX_CONF_FLAG,
    NGX_CONF_TAKE1, NGX_HTTP_LOC_CONF, NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_MAIN_CONF,
    NGX_HTTP_MAIN_CONF_OFFSET, NGX_HTTP_SRV_CONF, NGX_LOG_EMERG, NGX_LOG_NOTICE, NGX_OK,
};
use ngx::http::{HttpModuleMainConf, Merge, MergeConfigError};
use ngx::{ngx_conf_log_error, ngx_string};

use crate::fleet::{self, FleetConf};
use crate::reload::{keys_file_message, FileStamp};
use crate::zone::ZoneCtx;
use crate::AfrModule;

/// Smallest zone that holds the slab's own bookkeeping plus some counters.
const MIN_ZONE_SIZE: isize = 32 * 1024;

/// `http`-level configuration.
pub struct MainConf {
    /// Absolute path of the keys file.
    pub keys_path: Option<PathBuf>,
    /// The table parsed at configuration time; workers start from it.
    pub keys: Option<Arc<KeyTable>>,
    /// The file's identity when it was parsed, so workers notice later edits.
    pub keys_stamp: Option<FileStamp>,
    /// The `afr_zone` shared memory.
    pub zone: *mut ngx_shm_zone_t,
    /// How often each worker checks the keys file for changes.
    pub reload_interval: Duration,
    /// Some location says `afr on`.
    pub used: bool,
    /// `afr_fleet`: limits shared with other nodes through Redis.
    pub fleet: Option<FleetConf>,
}

impl Default for MainConf {
    fn default() -> Self {
        MainConf {
            keys_path: None,
            keys: None,
            keys_stamp: None,
            zone: ptr::null_mut(),
            reload_interval: Duration::from_millis(1000),
            used: false,
            fleet: None,
        }
    }
}

/// `http`/`server`/`location` configuration, merged downwards.
#[derive(Default)]
pub struct LocConf {
    /// `afr on|off`; unset inherits.
    pub enable: Option<bool>,
    /// `afr_upstream_secret`; unset inherits.
    pub secret: Option<String>,
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &LocConf) -> Result<(), MergeConfigError> {
        if self.enable.is_none() {
            self.enable = prev.enable;
        }
        if self.secret.is_none() {
            self.secret.clone_from(&prev.secret);
        }
        Ok(())
    }
}

const HTTP_ANY: u32 = NGX_HTTP_MAIN_CONF | NGX_HTTP_SRV_CONF | NGX_HTTP_LOC_CONF;

/// The directive table referenced by the module table.
pub static mut COMMANDS: [ngx_command_t; 7] = [
    command(
        ngx_string!("afr_keys"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        set_keys,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        ngx_string!("afr_zone"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        set_zone,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        ngx_string!("afr_reload_interval"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_TAKE1,
        set_reload_interval,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    command(
        ngx_string!("afr"),
        HTTP_ANY | NGX_CONF_FLAG,
        set_enable,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("afr_upstream_secret"),
        HTTP_ANY | NGX_CONF_TAKE1,
        set_secret,
        NGX_HTTP_LOC_CONF_OFFSET,
    ),
    command(
        ngx_string!("afr_fleet"),
        NGX_HTTP_MAIN_CONF | NGX_CONF_1MORE,
        set_fleet,
        NGX_HTTP_MAIN_CONF_OFFSET,
    ),
    ngx_command_t::empty(),
];

type SetFn = unsafe extern "C" fn(*mut ngx_conf_t, *mut ngx_command_t, *mut c_void) -> *mut c_char;

const fn command(name: ngx_str_t, type_: u32, set: SetFn, conf: usize) -> ngx_command_t {
    ngx_command_t {
        name,
        type_: type_ as ngx_uint_t,
        set: Some(set),
        conf,
        offset: 0,
        post: ptr::null_mut(),
    }
}

/// The directive's argument (`cf->args[1]`).
///
/// # Safety
/// `cf` must be the configuration being parsed, for a directive taking one argument.
unsafe fn arg1(cf: *mut ngx_conf_t) -> ngx_str_t {
    // SAFETY: nginx checked the argument count (TAKE1/FLAG) before calling the handler.
    unsafe { (*(*cf).args).as_slice::<ngx_str_t>()[1] }
}

fn emerg(cf: *mut ngx_conf_t, msg: &str) -> *mut c_char {
    ngx_conf_log_error!(NGX_LOG_EMERG, cf, "{msg}");
    NGX_CONF_ERROR
}

fn str_arg(cf: *mut ngx_conf_t, directive: &str, value: &ngx_str_t) -> Result<String, *mut c_char> {
    match std::str::from_utf8(value.as_bytes()) {
        Ok(s) => Ok(s.to_owned()),
        Err(_) => Err(emerg(
            cf,
            &format!("\"{directive}\" value is not valid UTF-8"),
        )),
    }
}

extern "C" fn set_keys(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf (NGX_HTTP_MAIN_CONF_OFFSET).
    let mcf = unsafe { &mut *conf.cast::<MainConf>() };
    if mcf.keys_path.is_some() {
        return emerg(cf, "\"afr_keys\" directive is duplicate");
    }
    // SAFETY: afr_keys takes one argument.
    let mut name = unsafe { arg1(cf) };
    // SAFETY: `cf->cycle` is valid while parsing; a relative path is resolved
    // against the configuration prefix, like `include`.
    if unsafe { ngx_conf_full_name((*cf).cycle, &mut name, 1) } != NGX_OK as isize {
        return NGX_CONF_ERROR;
    }
    let path = match str_arg(cf, "afr_keys", &name) {
        Ok(p) => PathBuf::from(p),
        Err(e) => return e,
    };
    let stamp = FileStamp::of(&path);
    match KeyTable::load(&path) {
        Ok(table) => {
            mcf.keys = Some(Arc::new(table));
            mcf.keys_stamp = stamp;
            mcf.keys_path = Some(path);
            NGX_CONF_OK
        }
        Err(e) => emerg(cf, &keys_file_message(&e)),
    }
}

extern "C" fn set_zone(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf (NGX_HTTP_MAIN_CONF_OFFSET).
    let mcf = unsafe { &mut *conf.cast::<MainConf>() };
    if !mcf.zone.is_null() {
        return emerg(cf, "\"afr_zone\" directive is duplicate");
    }
    // SAFETY: afr_zone takes one argument.
    let arg = unsafe { arg1(cf) };
    let bytes = arg.as_bytes();
    let Some(colon) = bytes.iter().position(|&b| b == b':').filter(|&i| i > 0) else {
        return emerg(
            cf,
            &format!(
                "invalid parameter \"{arg}\" in \"afr_zone\" directive, expected name:size, e.g. afr:10m"
            ),
        );
    };
    let mut name = ngx_str_t {
        len: colon,
        data: arg.data,
    };
    let mut size_str = ngx_str_t {
        len: arg.len - colon - 1,
        // SAFETY: `colon` < len, so the offset stays inside the argument.
        data: unsafe { arg.data.add(colon + 1) },
    };
    // SAFETY: `size_str` points into the argument, which outlives the call.
    let size = unsafe { ngx_parse_size(&mut size_str) };
    if size == -1 {
        return emerg(
            cf,
            &format!("invalid zone size \"{size_str}\" in \"afr_zone\" directive"),
        );
    }
    if size < MIN_ZONE_SIZE {
        return emerg(
            cf,
            &format!("\"afr_zone\" zone \"{name}\" is too small, it must be at least 32k"),
        );
    }
    // SAFETY: `cf` and its pool are valid while parsing.
    let pool = unsafe { Pool::from_ngx_pool((*cf).pool) };
    let ctx = pool.allocate(ZoneCtx::new(name.to_string()));
    if ctx.is_null() {
        return NGX_CONF_ERROR;
    }
    // SAFETY: `cf` is valid, `name` points into the argument; the tag is this
    // module, so a reload with the same name and size finds and reuses the zone.
    let zone = unsafe {
        ngx_shared_memory_add(
            cf,
            &mut name,
            size as usize,
            (&raw mut crate::ngx_http_afr_module).cast(),
        )
    };
    // SAFETY: a non-null return is a valid zone entry of this cycle.
    let Some(zone_ref) = (unsafe { zone.as_mut() }) else {
        return NGX_CONF_ERROR;
    };
    if !zone_ref.data.is_null() {
        return emerg(
            cf,
            &format!("duplicate zone \"{name}\" in \"afr_zone\" directive"),
        );
    }
    note_size_change(cf, &name, size as usize);
    zone_ref.init = Some(crate::zone::init_zone);
    zone_ref.data = ctx.cast();
    mcf.zone = zone;
    NGX_CONF_OK
}

extern "C" fn set_reload_interval(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf (NGX_HTTP_MAIN_CONF_OFFSET).
    let mcf = unsafe { &mut *conf.cast::<MainConf>() };
    // SAFETY: afr_reload_interval takes one argument.
    let mut arg = unsafe { arg1(cf) };
    // SAFETY: `arg` points into the parsed arguments.
    let ms = unsafe { ngx_parse_time(&mut arg, 0) };
    if ms <= 0 {
        return emerg(cf, &format!("invalid afr_reload_interval \"{arg}\""));
    }
    mcf.reload_interval = Duration::from_millis(ms as u64);
    NGX_CONF_OK
}

extern "C" fn set_enable(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's location conf (NGX_HTTP_LOC_CONF_OFFSET).
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    if lcf.enable.is_some() {
        return emerg(cf, "\"afr\" directive is duplicate");
    }
    // SAFETY: `afr` takes one argument (FLAG).
    let arg = unsafe { arg1(cf) };
    let on = match arg.as_bytes() {
        v if v.eq_ignore_ascii_case(b"on") => true,
        v if v.eq_ignore_ascii_case(b"off") => false,
        _ => {
            return emerg(
                cf,
                &format!(
                    "invalid value \"{arg}\" in \"afr\" directive, it must be \"on\" or \"off\""
                ),
            )
        }
    };
    lcf.enable = Some(on);
    if on {
        // SAFETY: `cf` is valid while parsing and inside the http block.
        if let Some(mcf) = AfrModule::main_conf_mut(unsafe { &*cf }) {
            mcf.used = true;
        }
    }
    NGX_CONF_OK
}

extern "C" fn set_secret(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's location conf (NGX_HTTP_LOC_CONF_OFFSET).
    let lcf = unsafe { &mut *conf.cast::<LocConf>() };
    if lcf.secret.is_some() {
        return emerg(cf, "\"afr_upstream_secret\" directive is duplicate");
    }
    // SAFETY: afr_upstream_secret takes one argument.
    let arg = unsafe { arg1(cf) };
    let secret = match str_arg(cf, "afr_upstream_secret", &arg) {
        Ok(s) => s,
        Err(e) => return e,
    };
    if secret.is_empty() || !secret.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return emerg(
            cf,
            "\"afr_upstream_secret\" must be non-empty printable ASCII",
        );
    }
    lcf.secret = Some(secret);
    NGX_CONF_OK
}

/// The `afr_fleet` directive handler; the directive itself is parsed in
/// `fleet/directive.rs`.
extern "C" fn set_fleet(
    cf: *mut ngx_conf_t,
    _cmd: *mut ngx_command_t,
    conf: *mut c_void,
) -> *mut c_char {
    // SAFETY: `conf` is this module's main conf (NGX_HTTP_MAIN_CONF_OFFSET).
    let mcf = unsafe { &mut *conf.cast::<MainConf>() };
    if mcf.fleet.is_some() {
        return emerg(cf, "\"afr_fleet\" directive is duplicate");
    }
    match fleet::parse(cf) {
        Ok(f) => {
            mcf.fleet = Some(f);
            NGX_CONF_OK
        }
        Err(msg) => emerg(cf, &msg),
    }
}

/// Refuses a configuration that enables `afr` without a keys file or a zone.
pub fn check_complete(cf: &mut ngx_conf_t) -> Result<(), ()> {
    let Some(mcf) = AfrModule::main_conf(cf) else {
        return Ok(());
    };
    if mcf.used && (mcf.keys.is_none() || mcf.zone.is_null()) {
        emerg(
            cf,
            "\"afr on\" requires both \"afr_keys\" and \"afr_zone\" in the http block",
        );
        return Err(());
    }
    Ok(())
}

/// On `nginx -s reload`, says at NOTICE when the zone's size changed: nginx
/// then maps a new zone (only one of the same name and size is reused), so
/// every key's counter starts afresh.
fn note_size_change(cf: *mut ngx_conf_t, name: &ngx_str_t, size: usize) {
    // SAFETY: `cf->cycle` is the cycle being configured; its `old_cycle` is the
    // running one (or the init cycle, whose list is empty), alive while parsing.
    let old_cycle = unsafe { (*(*cf).cycle).old_cycle };
    // SAFETY: as above; a null old cycle or an uninitialised list has no parts.
    let Some(old) = (unsafe { old_cycle.as_mut() }) else {
        return;
    };
    if old.shared_memory.part.elts.is_null() {
        return;
    }
    let tag = (&raw mut crate::ngx_http_afr_module).cast::<c_void>();
    let mut part = &raw mut old.shared_memory.part;
    // SAFETY: walking the parts of the old cycle's list of ngx_shm_zone_t.
    unsafe {
        while !part.is_null() {
            let zones = (*part).elts.cast::<ngx_shm_zone_t>();
            for i in 0..(*part).nelts {
                let z = &*zones.add(i);
                if z.tag == tag && z.shm.name.as_bytes() == name.as_bytes() && z.shm.size != size {
                    ngx_conf_log_error!(
                        NGX_LOG_NOTICE,
                        cf,
                        "\"afr_zone\" zone \"{}\" size changed from {}k to {}k: \
                         rate-limit counters start afresh",
                        name,
                        z.shm.size / 1024,
                        size / 1024
                    );
                }
            }
            part = (*part).next;
        }
    }
}
