//! The `afr_fleet` directive: its parameters, parsed into a [`FleetConf`].
//! The handler that stores it is `conf.rs`'s; errors come back as the
//! message nginx logs at `emerg`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ngx::ffi::{
    ngx_conf_full_name, ngx_conf_t, ngx_parse_time, ngx_str_t, ngx_thread_pool_add,
    ngx_thread_pool_t, NGX_OK,
};

/// The thread pool used without `thread_pool=`.
static DEFAULT_POOL: &str = "default";

/// Default Redis timeout (connect, and each read and write).
const DEFAULT_TIMEOUT_MS: u64 = 200;

/// The parsed `afr_fleet` directive.
pub(crate) struct FleetConf {
    /// Where Redis is, with the password from `password_file`.
    pub(super) info: Arc<redis::ConnectionInfo>,
    /// The URL as written, for log lines (passwords never appear in it:
    /// `password_file` is the only way to give one).
    pub(super) url: String,
    /// How long a refill may take (connect + call), for not sending another meanwhile.
    pub(super) refill_ms: u64,
    /// Nodes in the fleet: the local share while Redis is down is limit ÷ nodes.
    pub(super) nodes: u32,
    pub(super) timeout: Duration,
    /// With `rediss://` and `ca_file=`: the PEM of the CAs Redis's
    /// certificate is verified against (instead of the system's roots).
    pub(super) ca: Option<Arc<Vec<u8>>>,
    pub(super) pool: *mut ngx_thread_pool_t,
}

/// Parses the `afr_fleet` directive being read in `cf` (and adds its thread
/// pool); `Err` is the message to log at `emerg`.
pub(crate) fn parse(cf: *mut ngx_conf_t) -> Result<FleetConf, String> {
    // SAFETY: nginx checked the argument count (1MORE) before calling the handler.
    let args = unsafe { (*(*cf).args).as_slice::<ngx_str_t>() };
    let text = |s: &ngx_str_t| -> Result<String, String> {
        std::str::from_utf8(s.as_bytes())
            .map(str::to_owned)
            .map_err(|_| "\"afr_fleet\" value is not valid UTF-8".to_owned())
    };
    let url = text(&args[1])?;
    let tls = url.starts_with("rediss://");
    if !url.starts_with("redis://") && !tls {
        return Err(format!(
            "invalid URL \"{url}\" in \"afr_fleet\" directive, expected redis://host:port[/db] \
             (or rediss:// for TLS)"
        ));
    }
    let mut info: redis::ConnectionInfo =
        redis::IntoConnectionInfo::into_connection_info(url.as_str())
            .map_err(|e| format!("invalid URL \"{url}\" in \"afr_fleet\" directive: {e}"))?;
    if info.redis_settings().password().is_some() {
        return Err(format!(
            "\"afr_fleet\" URL \"{url}\" holds a password: use password_file= so it stays out of the configuration"
        ));
    }
    let (mut nodes, mut timeout, mut pool_name, mut ca) = (None, DEFAULT_TIMEOUT_MS, None, None);
    for a in &args[2..] {
        let a_text = text(a)?;
        let (name, value) = a_text
            .split_once('=')
            .ok_or_else(|| format!("invalid parameter \"{a_text}\" in \"afr_fleet\" directive"))?;
        match name {
            "nodes" => {
                let n: u32 = value.parse().ok().filter(|&n| n >= 1).ok_or_else(|| {
                    format!("invalid \"nodes\" value \"{value}\" in \"afr_fleet\" directive, it must be a whole number of at least 1")
                })?;
                nodes = Some(n);
            }
            "timeout" => {
                let mut s = ngx_str_t {
                    len: value.len(),
                    data: value.as_ptr().cast_mut(),
                };
                // SAFETY: `s` points into `a_text`, alive for the call; nginx only reads it.
                let ms = unsafe { ngx_parse_time(&mut s, 0) };
                if ms <= 0 {
                    return Err(format!(
                        "invalid \"timeout\" value \"{value}\" in \"afr_fleet\" directive"
                    ));
                }
                timeout = ms as u64;
            }
            "ca_file" => {
                if !tls {
                    return Err(format!(
                        "\"afr_fleet\" ca_file= needs a rediss:// URL (Redis over TLS), not \"{url}\""
                    ));
                }
                let path = full_path(cf, "ca_file", value)?;
                let pem = std::fs::read(&path).map_err(|e| {
                    format!(
                        "\"afr_fleet\" ca_file \"{}\" cannot be read: {e}",
                        path.display()
                    )
                })?;
                if !pem.windows(11).any(|w| w == b"-----BEGIN ") {
                    return Err(format!(
                        "\"afr_fleet\" ca_file \"{}\" holds no PEM certificate",
                        path.display()
                    ));
                }
                ca = Some(Arc::new(pem));
            }
            "password_file" => {
                let path = full_path(cf, "password_file", value)?;
                let pass = std::fs::read_to_string(&path).map_err(|e| {
                    format!(
                        "\"afr_fleet\" password_file \"{}\" cannot be read: {e}",
                        path.display()
                    )
                })?;
                let pass = pass.trim_end_matches(['\r', '\n']);
                if pass.is_empty() {
                    return Err(format!(
                        "\"afr_fleet\" password_file \"{}\" is empty",
                        path.display()
                    ));
                }
                let settings = info.redis_settings().clone().set_password(pass);
                info = info.set_redis_settings(settings);
            }
            "thread_pool" if !value.is_empty() => {
                // SAFETY: the value is the tail of the argument `a`, in the cycle pool.
                pool_name = Some(ngx_str_t {
                    len: value.len(),
                    data: unsafe { a.data.add(a.len - value.len()) },
                });
            }
            _ => {
                return Err(format!(
                    "invalid parameter \"{a_text}\" in \"afr_fleet\" directive"
                ))
            }
        }
    }
    let nodes = nodes.ok_or_else(|| {
        "\"afr_fleet\" directive needs nodes=N (how many nodes share the limits; \
         each keeps limit/N while Redis is down)"
            .to_owned()
    })?;
    // `thread_pool=` names a `thread_pool` block; without it nginx's "default"
    // pool (32 threads) is made for us, as `aio threads` does. nginx keeps
    // the name's pointer: it points into the directive's argument, which
    // lives in the cycle pool, or at a static.
    let mut name = pool_name.unwrap_or(ngx_str_t {
        len: DEFAULT_POOL.len(),
        data: DEFAULT_POOL.as_ptr().cast_mut(),
    });
    // SAFETY: `cf` is the configuration being parsed; `name` outlives the cycle.
    let pool = unsafe { ngx_thread_pool_add(cf, &mut name) };
    if pool.is_null() {
        return Err(format!("\"afr_fleet\" cannot use thread pool \"{name}\""));
    }
    Ok(FleetConf {
        info: Arc::new(info),
        ca,
        url,
        refill_ms: 3 * timeout,
        nodes,
        timeout: Duration::from_millis(timeout),
        pool,
    })
}

fn full_path(cf: *mut ngx_conf_t, param: &str, value: &str) -> Result<PathBuf, String> {
    let mut s = ngx_str_t {
        len: value.len(),
        data: value.as_ptr().cast_mut(),
    };
    // SAFETY: `cf->cycle` is valid while parsing; nginx allocates the full
    // name in the cycle pool and leaves `value` untouched.
    if unsafe { ngx_conf_full_name((*cf).cycle, &mut s, 1) } != NGX_OK as isize {
        return Err(format!(
            "\"afr_fleet\" {param} \"{value}\" is not a valid path"
        ));
    }
    Ok(PathBuf::from(
        String::from_utf8_lossy(s.as_bytes()).into_owned(),
    ))
}
