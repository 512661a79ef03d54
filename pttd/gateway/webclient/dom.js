// DOM helpers. Every string from outside (messages, names, keys, file names) goes into
// the page as a Text node or an attribute value: nothing here parses HTML.

const FORBIDDEN = new Set(['innerHTML', 'outerHTML', 'style', 'srcdoc']);

/** h('li', {class: 'msg', onclick: fn, text: 'x'}, child, 'text', [more]) */
export function h(tag, props, ...children) {
  const el = tag.startsWith('svg:')
    ? document.createElementNS('http://www.w3.org/2000/svg', tag.slice(4))
    : document.createElement(tag);
  if (props) {
    for (const [k, v] of Object.entries(props)) {
      if (v == null || v === false) continue;
      if (FORBIDDEN.has(k)) throw new Error(`h(): ${k} is not allowed`);
      if (k === 'class') el.setAttribute('class', v);
      else if (k === 'text') el.textContent = v;
      else if (k === 'dataset') Object.assign(el.dataset, v);
      else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
      else if (k === 'value' || k === 'checked' || k === 'disabled' || k === 'hidden') el[k] = v;
      else el.setAttribute(k, v === true ? '' : String(v));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c == null || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c); // a string becomes a Text node
  }
}

export function clear(el) {
  while (el.firstChild) el.firstChild.remove();
}

export function shortKey(key) {
  return typeof key === 'string' ? key.slice(0, 8) + '…' : '?';
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });
const fullFmt = new Intl.DateTimeFormat(undefined, { dateStyle: 'full', timeStyle: 'medium' });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: 'long', day: 'numeric', month: 'long', year: 'numeric' });

/** A date a Date can hold (ms, integer, |ms| <= 8.64e15): the formats throw on others. */
export function validDate(ms) {
  return Number.isInteger(ms) && Math.abs(ms) <= 8.64e15;
}

export function fmtTime(ms) {
  return validDate(ms) ? timeFmt.format(ms) : '';
}
export function fmtFull(ms) {
  return validDate(ms) ? fullFmt.format(ms) : '';
}

/** The local calendar day of a date, as YYYY-MM-DD (day separators). */
export function dayKey(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${String(d.getMonth() + 1).padStart(2, '0')}-${String(d.getDate()).padStart(2, '0')}`;
}

export function fmtDay(ms, now = Date.now()) {
  if (!validDate(ms)) return '';
  const k = dayKey(ms);
  if (k === dayKey(now)) return 'Today';
  if (k === dayKey(now - 86400000)) return 'Yesterday';
  return dayFmt.format(ms);
}

export function fmtSize(n) {
  if (!Number.isFinite(n) || n < 0) return '';
  if (n < 1024) return `${n} B`;
  const units = ['KB', 'MB', 'GB'];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v < 10 ? v.toFixed(1) : Math.round(v)} ${units[i]}`;
}

/** Text with http(s) links made clickable; everything stays text nodes. */
export function linkify(text) {
  const out = [];
  const re = /\bhttps?:\/\/[^\s<>"']+[^\s<>"'.,;:!?)\]]/g;
  let last = 0;
  for (let m; (m = re.exec(text)); ) {
    let url;
    try {
      url = new URL(m[0]);
    } catch {
      continue;
    }
    if (url.protocol !== 'http:' && url.protocol !== 'https:') continue;
    if (m.index > last) out.push(text.slice(last, m.index));
    out.push(h('a', { href: url.href, target: '_blank', rel: 'noopener noreferrer' }, m[0]));
    last = m.index + m[0].length;
  }
  if (last < text.length) out.push(text.slice(last));
  return out;
}

export const HEX64 = /^[0-9a-fA-F]{64}$/;
export const ID_RE = /^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$/;

export function validTopic(name) {
  return ID_RE.test(name) && !name.includes('..') && name !== '__gossiping';
}

/** Copy text to the clipboard (the API where allowed, else a selected field). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    try {
      await navigator.clipboard.writeText(text);
      return true;
    } catch {
      /* fall back below */
    }
  }
  const ta = h('textarea', { class: 'offscreen', readonly: true, 'aria-hidden': 'true' });
  ta.value = text;
  document.body.append(ta);
  ta.select();
  let ok = false;
  try {
    ok = document.execCommand('copy');
  } catch {
    ok = false;
  }
  ta.remove();
  return ok;
}

const ICONS = {
  attach: 'M21 11.5l-8.5 8.5a5.5 5.5 0 0 1-7.8-7.8l9-9a3.7 3.7 0 0 1 5.2 5.2l-9 9a1.8 1.8 0 0 1-2.6-2.6l8.3-8.3',
  smile: 'M12 3a9 9 0 1 0 0 18a9 9 0 1 0 0-18M8 14c1 1.7 2.4 2.5 4 2.5s3-.8 4-2.5M9 9.5h.01M15 9.5h.01',
  edit: 'M4 20h4L19 9l-4-4L4 16zM13.5 6.5l4 4',
  trash: 'M4 7h16M10 11v6M14 11v6M9 7V4h6v3M6 7l1 13h10l1-13',
  hide: 'M3 3l18 18M10.6 6.1A10 10 0 0 1 12 6c5 0 9 6 9 6a17 17 0 0 1-2.6 3.2M6.6 7.6C4.3 9.2 3 12 3 12s4 6 9 6a9 9 0 0 0 4-.9',
  file: 'M14 3H6a1 1 0 0 0-1 1v16a1 1 0 0 0 1 1h12a1 1 0 0 0 1-1V8zM14 3v5h5',
  close: 'M6 6l12 12M18 6L6 18',
  menu: 'M4 6h16M4 12h16M4 18h16',
};

/** A small line icon (SVG, decorative: the button around it carries the label). */
export function icon(name) {
  const NS = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(NS, 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('class', 'icon');
  svg.setAttribute('aria-hidden', 'true');
  svg.setAttribute('fill', 'none');
  svg.setAttribute('stroke', 'currentColor');
  svg.setAttribute('stroke-width', '2');
  svg.setAttribute('stroke-linecap', 'round');
  svg.setAttribute('stroke-linejoin', 'round');
  const p = document.createElementNS(NS, 'path');
  p.setAttribute('d', ICONS[name]);
  svg.append(p);
  return svg;
}
