// Page-wide pieces: short notices (toasts) and the disconnected banner.

import { h } from './dom.js';

let toasts = null;

export function toast(message, kind = 'info') {
  if (!toasts) {
    toasts = h('div', { id: 'toasts', class: 'toasts', role: 'status', 'aria-live': 'polite' });
    document.body.append(toasts);
  }
  const el = h('div', { class: `toast ${kind}`, role: kind === 'error' ? 'alert' : null }, String(message));
  toasts.append(el);
  setTimeout(() => el.remove(), kind === 'error' ? 8000 : 4000);
}

export function errorToast(e, what) {
  const msg = e && e.message ? e.message : String(e);
  toast(what ? `${what}: ${msg}` : msg, 'error');
}
