// The login screen: whatever the gateway offers (GET /gateway.json): password and
// registration, OpenID Connect providers, bring-your-own-key (an Ed25519 seed signed
// with in the browser by WebCrypto; the seed never leaves the page), the dev login.

import { ApiError, publicCall, setSession } from './api.js';
import { HEX64, h } from './dom.js';

const OIDC_KEY = 'pttd.oidc';

function hex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

function unhex(s) {
  const out = new Uint8Array(s.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(s.slice(i * 2, i * 2 + 2), 16);
  return out;
}

function b64url(bytes) {
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

function fromB64url(s) {
  const b = atob(s.replace(/-/g, '+').replace(/_/g, '/') + '='.repeat((4 - (s.length % 4)) % 4));
  return Uint8Array.from(b, (c) => c.charCodeAt(0));
}

function random(n) {
  return crypto.getRandomValues(new Uint8Array(n));
}

export function keyLoginAvailable() {
  return !!(window.isSecureContext && crypto.subtle);
}

/** Log in with a 32-byte Ed25519 seed (hex): ask a challenge, sign it here. */
async function keyLogin(seedHex) {
  const pkcs8 = new Uint8Array(48);
  pkcs8.set([0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20]);
  pkcs8.set(unhex(seedHex), 16);
  let priv;
  try {
    priv = await crypto.subtle.importKey('pkcs8', pkcs8, { name: 'Ed25519' }, true, ['sign']);
  } catch {
    throw new Error('this browser cannot sign with Ed25519 keys');
  } finally {
    pkcs8.fill(0);
  }
  const jwk = await crypto.subtle.exportKey('jwk', priv);
  const key = hex(fromB64url(jwk.x));
  const ch = await fetchJSON(`login/challenge?key=${key}`);
  const sig = new Uint8Array(await crypto.subtle.sign({ name: 'Ed25519' }, priv, unhex(ch.sign)));
  return publicCall('POST', 'login', { key, nonce: ch.nonce, signature: hex(sig) });
}

async function fetchJSON(path) {
  let r;
  try {
    r = await fetch(path);
  } catch {
    throw new ApiError(0, 'the gateway cannot be reached');
  }
  const body = await r.json().catch(() => null);
  if (!r.ok || !body) throw new ApiError(r.status, (body && body.error) || r.statusText);
  return body.result;
}

function redirectURI() {
  return location.origin + location.pathname;
}

function startOIDC(p) {
  const nonce = b64url(random(16));
  const state = b64url(random(16));
  sessionStorage.setItem(OIDC_KEY, JSON.stringify({ nonce, state, issuer: p.issuer }));
  const q = new URLSearchParams({
    response_type: 'id_token',
    client_id: p.client_id,
    redirect_uri: redirectURI(),
    scope: 'openid email profile',
    nonce,
    state,
  });
  location.assign(`${p.authorization_endpoint}?${q}`);
}

/** Back from a provider: #id_token=… (or #error=…) in the URL. Returns null when the
 *  URL holds no answer, else a promise of the login (or of an error to show). */
export function oidcReturn() {
  const frag = location.hash.slice(1);
  if (!/(^|&)(id_token|error)=/.test(frag)) return null;
  const q = new URLSearchParams(frag);
  history.replaceState(null, '', location.pathname + location.search); // no token left in the URL
  let saved = null;
  try {
    saved = JSON.parse(sessionStorage.getItem(OIDC_KEY));
  } catch {
    saved = null;
  }
  sessionStorage.removeItem(OIDC_KEY);
  // no login was started in this tab: a crafted link, not an answer (nothing is shown
  // of it, and a logged-in user stays where they are)
  if (!saved) return null;
  return (async () => {
    if (q.get('state') !== saved.state) throw new Error('this login answer was not asked for here: try again');
    if (q.get('error')) throw new Error(`the provider refused: ${q.get('error_description') || q.get('error')}`);
    const token = q.get('id_token');
    let claims = null;
    try {
      claims = JSON.parse(new TextDecoder().decode(fromB64url(token.split('.')[1])));
    } catch {
      claims = null;
    }
    if (!claims || claims.nonce !== saved.nonce) throw new Error('the login answer does not match this login: try again');
    return publicCall('POST', 'login', { id_token: token });
  })();
}

/** Build the login screen. info: gateway.json's result; message: shown on top. */
export function loginView(info, message) {
  const login = info.login || {};
  const status = h('p', { class: 'status', role: 'alert', text: message || '' });
  const busy = (form, on) => {
    for (const el of form.querySelectorAll('button, input, textarea')) el.disabled = on;
  };
  const run = async (form, fn, method = null) => {
    status.textContent = '';
    busy(form, true);
    try {
      setSession(await fn(), 'login', method);
    } catch (e) {
      status.textContent = e.message || String(e);
      busy(form, false);
    }
  };

  const sections = [];

  if (login.password) {
    const user = h('input', { id: 'login-user', name: 'username', autocomplete: 'username', required: true, maxlength: 64 });
    const pass = h('input', {
      id: 'login-pass',
      name: 'password',
      type: 'password',
      autocomplete: 'current-password',
      required: true,
      minlength: 8,
      maxlength: 1024,
    });
    let action = 'login';
    const form = h(
      'form',
      {
        class: 'card',
        'aria-labelledby': 'pw-title',
        onsubmit: (e) => {
          e.preventDefault();
          run(form, () => publicCall('POST', action, { username: user.value.trim(), password: pass.value }), 'password');
        },
      },
      h('h2', { id: 'pw-title', text: 'Log in with a password' }),
      h('label', { for: 'login-user' }, 'Name'),
      user,
      h('label', { for: 'login-pass' }, 'Password (8 characters or more)'),
      pass,
      h(
        'div',
        { class: 'row' },
        h('button', { type: 'submit', class: 'primary', onclick: () => (action = 'login') }, 'Log in'),
        login.register
          ? h('button', { type: 'submit', id: 'register', onclick: () => (action = 'register') }, 'Create an account')
          : null,
      ),
    );
    sections.push(form);
  }

  const providers = (Array.isArray(login.oidc) ? login.oidc : []).filter(
    (p) => p && typeof p.authorization_endpoint === 'string' && /^https?:\/\//.test(p.authorization_endpoint),
  );
  if (providers.length) {
    sections.push(
      h(
        'div',
        { class: 'card' },
        h('h2', { text: 'Log in with a provider' }),
        providers.map((p) =>
          h('button', { type: 'button', class: 'oidc', onclick: () => startOIDC(p) }, `Log in with ${p.name || p.issuer}`),
        ),
      ),
    );
  }

  if (login.key) {
    if (keyLoginAvailable()) {
      const seed = h('input', {
        id: 'login-seed',
        type: 'password',
        autocomplete: 'off',
        spellcheck: 'false',
        required: true,
        pattern: '[0-9a-fA-F]{64}',
        title: '64 hex digits',
      });
      const form = h(
        'form',
        {
          class: 'card',
          onsubmit: (e) => {
            e.preventDefault();
            const s = seed.value.trim();
            if (!HEX64.test(s)) {
              status.textContent = 'The secret key is 64 hex digits (the seed in your node’s keys/ file).';
              return;
            }
            run(form, () => keyLogin(s.toLowerCase()));
            seed.value = '';
          },
        },
        h('h2', { text: 'Log in with your own key' }),
        h('p', { class: 'hint' }, 'For a repository you run on your own node. The key is used here to sign the gateway’s challenge and is not sent anywhere; this gateway can read your repository but not write to it.'),
        h('label', { for: 'login-seed' }, 'Secret key (64 hex digits)'),
        seed,
        h('div', { class: 'row' }, h('button', { type: 'submit' }, 'Log in with key')),
      );
      sections.push(form);
    }
  }

  if (login.test_login) {
    const id = h('input', { id: 'login-dev', required: true, maxlength: 64, autocomplete: 'off' });
    const form = h(
      'form',
      {
        class: 'card dev',
        onsubmit: (e) => {
          e.preventDefault();
          run(form, () => publicCall('POST', 'test-login', { id: id.value.trim() }));
        },
      },
      h('h2', { text: 'Development login' }),
      h('p', { class: 'hint' }, 'Enabled on this gateway for testing only: anyone can log in as any name.'),
      h('label', { for: 'login-dev' }, 'Name'),
      id,
      h('div', { class: 'row' }, h('button', { type: 'submit' }, 'Dev login')),
    );
    sections.push(form);
  }

  if (!sections.length) sections.push(h('p', { class: 'card', text: 'This gateway offers no way to log in from a browser.' }));

  return h(
    'main',
    { class: 'login', id: 'login' },
    h('h1', { text: 'pttd chat' }),
    status,
    sections,
    h('p', { class: 'hint footer', text: `gateway ${info.key ? info.key.slice(0, 16) + '…' : ''} · pttd ${info.version || ''}` }),
  );
}
