// The gateway's HTTP API: the login session (kept in localStorage, renewed before it
// expires and on a 401, one renewal at a time across tabs), JSON calls, file uploads
// with progress, and files fetched as blobs (so no token ever sits in a URL of the page).
// Paths are relative to the page, so a gateway behind a reverse proxy at /chat/ works.

const SKEY = 'pttd.session';
// renew a quarter of the token's life (at most a minute) before it expires; renew
// first, before a call, when less than a fifth (at most 30 s) is left
const early = () => Math.min(60_000, ((session && session.ttl) || 900_000) / 4);
const late = () => Math.min(30_000, ((session && session.ttl) || 900_000) / 5);

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

let session = load();
let timer = null;
const listeners = new Set();

function load() {
  try {
    const s = JSON.parse(localStorage.getItem(SKEY));
    return s && typeof s.token === 'string' && typeof s.refresh_token === 'string' && typeof s.key === 'string'
      ? s
      : null;
  } catch {
    return null;
  }
}

/** fn(session or null, why) on login, renewal, logout (also by another tab). */
export function onSession(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function notify(why) {
  for (const fn of listeners) fn(session, why);
}

export function getSession() {
  return session;
}

/** method: how the user logged in ('password', …); a refresh keeps the session's. */
export function setSession(res, why = 'login', method = null) {
  const was = session && session.key === res.key ? session.method : null;
  session = {
    method: method || was || null,
    key: res.key,
    token: res.token,
    refresh_token: res.refresh_token,
    ttl: (Number(res.expires_in) || 900) * 1000,
    exp: Date.now() + (Number(res.expires_in) || 900) * 1000,
  };
  localStorage.setItem(SKEY, JSON.stringify(session));
  schedule();
  notify(why);
}

export function clearSession(why = 'logout') {
  session = null;
  localStorage.removeItem(SKEY);
  clearTimeout(timer);
  revokeBlobs();
  notify(why);
}

// Another tab renewed the session (adopt its tokens: ours were spent) or logged out.
window.addEventListener('storage', (e) => {
  if (e.key !== SKEY) return;
  const next = load();
  if (!next) {
    if (session) clearSession('elsewhere');
    return;
  }
  const was = session;
  session = next;
  schedule();
  notify(was && was.key === next.key ? 'refresh' : 'login');
});

function schedule() {
  clearTimeout(timer);
  if (!session) return;
  const wait = Math.max(1_000, session.exp - Date.now() - early());
  timer = setTimeout(() => refresh().catch(() => {}), wait);
}

// a tab that slept (timers held back) renews as soon as it is seen again
document.addEventListener('visibilitychange', () => {
  if (document.visibilityState === 'visible' && session && session.exp - Date.now() < early()) {
    refresh().catch(() => {});
  }
});

let refreshing = null;

/** Renew the access token. One renewal at a time in this tab, and across tabs (the
 *  refresh token is single-use: a second use would end the session). */
export function refresh() {
  if (!refreshing) refreshing = lockAnd(doRefresh).finally(() => (refreshing = null));
  return refreshing;
}

function lockAnd(fn) {
  return navigator.locks ? navigator.locks.request('pttd-refresh', fn) : fn();
}

async function doRefresh() {
  const stored = load();
  if (!stored) {
    if (session) clearSession('elsewhere');
    throw new ApiError(401, 'logged out');
  }
  // another tab renewed it while we waited for the lock
  if (session && stored.refresh_token !== session.refresh_token && stored.exp - Date.now() > early()) {
    session = stored;
    schedule();
    notify('refresh');
    return;
  }
  let r;
  try {
    r = await fetch('refresh', {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ data: { refresh_token: stored.refresh_token } }),
    });
  } catch (e) {
    schedule(); // the gateway is unreachable: try again later, still logged in
    throw new ApiError(0, 'the gateway cannot be reached');
  }
  const body = await r.json().catch(() => null);
  if (!r.ok) {
    const msg = (body && body.error) || r.statusText;
    if (r.status === 401 || r.status === 400) clearSession('expired');
    else schedule();
    throw new ApiError(r.status, msg);
  }
  setSession(body.result, 'refresh');
}

async function fresh() {
  if (session && session.exp - Date.now() < late()) await refresh();
}

function authHeaders() {
  return session ? { Authorization: `Bearer ${session.token}` } : {};
}

/** The current access token (renewed first if about to expire): for the event stream. */
export async function token() {
  await fresh();
  if (!session) throw new ApiError(401, 'logged out');
  return session.token;
}

async function parse(r) {
  let body = null;
  try {
    body = await r.json();
  } catch {
    body = null;
  }
  if (!r.ok || !body || !('result' in body)) {
    throw new ApiError(r.status, (body && body.error) || `${r.status} ${r.statusText}`);
  }
  return body.result;
}

async function send(method, path, data) {
  const init = { method, headers: authHeaders() };
  if (data !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify({ data });
  }
  try {
    return await fetch(path, init);
  } catch {
    throw new ApiError(0, 'the gateway cannot be reached');
  }
}

/** A call with the login token: renewed before it expires, and once on a 401. */
export async function call(method, path, data) {
  if (!session) throw new ApiError(401, 'logged out');
  await fresh();
  let r = await send(method, path, data);
  if (r.status === 401 && session) {
    await refresh();
    r = await send(method, path, data);
  }
  return parse(r);
}

/** A call without a token (gateway.json, logins). */
export async function publicCall(method, path, data) {
  const init = { method, headers: {} };
  if (data !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify({ data });
  }
  let r;
  try {
    r = await fetch(path, init);
  } catch {
    throw new ApiError(0, 'the gateway cannot be reached');
  }
  return parse(r);
}

export async function logout() {
  try {
    if (session) await send('POST', 'logout');
  } finally {
    clearSession('logout');
  }
}

/** POST /files with the file's bytes; onProgress(sent, total). Returns {promise, abort}.
 * sealed: the gateway stores it encrypted with a new key, answered as `secret` (for a
 * direct message, whose encrypted envelope carries the secret). */
export function upload(file, onProgress, sealed = false) {
  let xhr = null;
  let aborted = false;
  const attempt = (retry) =>
    new Promise((resolve, reject) => {
      xhr = new XMLHttpRequest();
      xhr.open('POST', 'files?name=' + encodeURIComponent(file.name || 'file') + (sealed ? '&sealed=1' : ''));
      xhr.setRequestHeader('Authorization', `Bearer ${session ? session.token : ''}`);
      xhr.upload.onprogress = (e) => onProgress(e.loaded, e.lengthComputable ? e.total : file.size);
      xhr.onload = () => {
        let body = null;
        try {
          body = JSON.parse(xhr.responseText);
        } catch {
          body = null;
        }
        if (xhr.status === 401 && retry) {
          refresh().then(() => attempt(false).then(resolve, reject), reject);
          return;
        }
        if (xhr.status !== 200 || !body || !('result' in body)) {
          reject(new ApiError(xhr.status, (body && body.error) || `upload failed (${xhr.status})`));
          return;
        }
        resolve(body.result);
      };
      xhr.onerror = () => reject(new ApiError(0, 'the upload failed: the gateway cannot be reached'));
      xhr.onabort = () => reject(new ApiError(0, 'upload cancelled'));
      xhr.send(file);
    });
  const promise = (async () => {
    await fresh();
    if (aborted) throw new ApiError(0, 'upload cancelled');
    return attempt(true);
  })();
  return {
    promise,
    abort() {
      aborted = true;
      if (xhr) xhr.abort();
    },
  };
}

const blobs = new Map();

/** A file of any repository as an object URL (fetched once with the token in a header;
 * a sealed file's secret goes in a header too, never in a URL). */
export function fileURL(key, id, secret) {
  // the secret is part of what was fetched: the same id asked without it (a public
  // message naming a sealed file) must not put the sealed bytes in its place
  const k = `${key}/${id}/${secret || ''}`;
  const headers = () => (secret ? { ...authHeaders(), 'X-File-Secret': secret } : authHeaders());
  let p = blobs.get(k);
  if (!p) {
    p = (async () => {
      await fresh();
      const path = `files/${encodeURIComponent(key)}/${encodeURIComponent(id)}`;
      let r = await fetch(path, { headers: headers() });
      if (r.status === 401 && session) {
        await refresh();
        r = await fetch(path, { headers: headers() });
      }
      if (!r.ok) throw new ApiError(r.status, `the file could not be fetched (${r.status})`);
      return URL.createObjectURL(await r.blob());
    })();
    p.catch(() => blobs.delete(k));
    blobs.set(k, p);
  }
  return p;
}

function revokeBlobs() {
  for (const p of blobs.values()) p.then((u) => URL.revokeObjectURL(u), () => {});
  blobs.clear();
}
