# afr_nginx_reload: reloads nginx, never restarts it, and only once `nginx -t` passes.
# scripts/package puts this function into every maintainer script that changes what
# nginx loads (where the script says #AFR_NGINX_RELOAD#), so all share one text.
#   - Debian's nginx declares the nginx-reload trigger (what Debian's own libnginx-mod-*
#     packages use): nginx reloads once, after every package of this run is configured.
#   - nginx.org's nginx has no trigger: reload it through its service, if it runs.
# A failing `nginx -t` is printed and nginx is left running on the configuration it has.
afr_nginx_reload() {
    command -v nginx >/dev/null 2>&1 || return 0
    if ! out=$(nginx -t -q 2>&1); then
        echo "afr: 'nginx -t' fails, so nginx was not reloaded (it keeps running as it was):" >&2
        echo "$out" >&2
        return 0
    fi
    if dpkg-query --control-show nginx triggers 2>/dev/null | grep -qw nginx-reload; then
        dpkg-trigger --no-await nginx-reload
    elif invoke-rc.d --quiet nginx status >/dev/null 2>&1; then
        invoke-rc.d nginx reload || true
    fi
}
