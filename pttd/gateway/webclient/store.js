// What the page knows: the hub's topics and their messages (each by author and id),
// conversations of direct messages, profiles, friends, channels, and read marks. Views
// subscribe with on(); changes are announced once per animation frame.

import { validDate } from './dom.js';

export const KEEP = 200; // messages per topic kept from a snapshot; older ones are paged in
export const PAGE = 100; // messages per page of history

export const state = {
  me: null,
  info: null, // gateway.json
  profile: { name: '' },
  profiles: new Map(), // key -> profile, from the hub
  topics: new Map(), // name -> Topic
  topicsLoaded: false,
  convs: new Map(), // conversation key -> Conv
  convsLoaded: false,
  friends: [],
  pchannels: [],
  hidden: new Set(), // author/id hidden by this reader: a late event must not bring them back
};

// --- change notification --------------------------------------------------------------

const subs = new Map();
let pending = new Map();
let scheduled = false;

export function on(type, fn) {
  if (!subs.has(type)) subs.set(type, new Set());
  subs.get(type).add(fn);
  return () => subs.get(type).delete(fn);
}

/** Announce a change (coalesced: each (type, detail) once per frame). */
export function changed(type, detail = '') {
  if (!pending.has(type)) pending.set(type, new Set());
  pending.get(type).add(detail);
  if (!scheduled) {
    scheduled = true;
    requestAnimationFrame(flush);
  }
}

export function flushNow() {
  if (scheduled) flush();
}

function flush() {
  scheduled = false;
  const now = pending;
  pending = new Map();
  for (const [type, details] of now) {
    for (const fn of subs.get(type) || []) {
      try {
        fn(details);
      } catch (err) {
        // one view's failure must not drop the changes the others are told of
        console.error(err);
      }
    }
  }
}

// --- topics ---------------------------------------------------------------------------

export const msgKey = (m) => `${m.author}/${m.id}`;

function cmp(a, b) {
  return a.date - b.date || (a.author < b.author ? -1 : a.author > b.author ? 1 : 0) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0);
}

let version = 0;

export class Topic {
  constructor(name) {
    this.name = name;
    this.msgs = new Map();
    this._sorted = null;
    this.hasOlder = false; // the hub holds messages older than those here
    this.loadingOlder = null;
  }
  sorted() {
    if (!this._sorted) this._sorted = [...this.msgs.values()].sort(cmp);
    return this._sorted;
  }
  last() {
    const s = this.sorted();
    return s.length ? s[s.length - 1].date : 0;
  }
  oldest() {
    const s = this.sorted();
    return s.length ? s[0].date : null;
  }
  put(m) {
    m._v = ++version;
    this.msgs.set(msgKey(m), m);
    this._sorted = null;
  }
  remove(key) {
    if (this.msgs.delete(key)) this._sorted = null;
  }
}

export function topic(name, create = true) {
  let t = state.topics.get(name);
  if (!t && create) {
    t = new Topic(name);
    state.topics.set(name, t);
    changed('topics');
  }
  return t;
}

function validMessage(m) {
  return (
    m &&
    typeof m === 'object' &&
    typeof m.id === 'string' &&
    typeof m.author === 'string' &&
    validDate(m.date) &&
    (m.edited === undefined || m.edited === null || validDate(m.edited)) &&
    m.message &&
    typeof m.message === 'object' &&
    typeof m.message.type === 'string'
  );
}

/** A hub snapshot: replaces every topic (each kept to its newest KEEP messages). */
export function applySnapshot(snap) {
  const old = state.topics;
  state.topics = new Map();
  for (const [name, msgs] of Object.entries(snap.topics || {})) {
    const t = new Topic(name);
    const list = (Array.isArray(msgs) ? msgs : []).filter(validMessage);
    const keep = list.length > KEEP ? list.slice(list.length - KEEP) : list;
    t.hasOlder = list.length > KEEP;
    for (const m of keep) t.put(m);
    state.topics.set(name, t);
    changed('topic', name);
  }
  // topics made here that the hub has not shown yet stay
  for (const [name, t] of old) {
    if (!state.topics.has(name)) {
      if (t.msgs.size === 0) state.topics.set(name, t);
      changed('topic', name);
    }
  }
  applyProfiles(snap.profiles || {}, [], true);
  state.topicsLoaded = true;
  changed('topics');
}

/** A hub update: messages put in place by (author, id), removed ones dropped. */
export function applyUpdate(u) {
  if (!u || typeof u.topic !== 'string') return;
  const t = topic(u.topic);
  const oldest = t.hasOlder ? t.oldest() : null;
  for (const m of u.messages || []) {
    if (!validMessage(m)) continue;
    // older than what is held while older pages are still on the hub: paged in later
    if (oldest !== null && m.date < oldest && !t.msgs.has(msgKey(m))) continue;
    state.hidden.delete(msgKey(m)); // shown again (moderation "show")
    t.put(m);
  }
  for (const r of u.removed || []) {
    if (r && typeof r.author === 'string') t.remove(`${r.author}/${r.id}`);
  }
  changed('topic', u.topic);
  changed('topics');
}

/** A post of this gateway's stream, or the answer to our own write: shown at once,
 *  the hub's view (which follows a moment later) has the last word. */
export function applyPost(ev) {
  const { author, topic: name, post } = ev || {};
  if (typeof author !== 'string' || typeof name !== 'string' || !post || typeof post.id !== 'string') return;
  const t = topic(name);
  const key = `${author}/${post.id}`;
  if (ev.action === 'delete') {
    t.remove(key);
  } else {
    if (state.hidden.has(key)) return;
    const old = t.msgs.get(key);
    // An edit of a message not held is not taken in: it is hidden (by a moderator, or by
    // this reader before a reload), or older than the pages held (it would open a gap in
    // the history above it). The hub's view, or the next page, brings it as it is.
    if (ev.action === 'edit' && !old) return;
    const m = { ...post, author, name: old ? old.name : null, reactions: old ? old.reactions : [] };
    if (!validMessage(m)) return;
    t.put(m);
  }
  changed('topic', name);
  changed('topics');
}

/** Older messages of a page (from the hub or the gateway), merged in. */
export function addOlder(t, page, limit) {
  let added = 0;
  for (const m of page) {
    if (validMessage(m) && !t.msgs.has(msgKey(m)) && !state.hidden.has(msgKey(m))) {
      t.put(m);
      added++;
    }
  }
  // a short page is the last; a full page of only known messages (more than a page
  // sharing one date) cannot be paged past
  t.hasOlder = page.length >= limit && added > 0;
  changed('topic', t.name);
}

export function applyProfiles(profiles, removed = [], quiet = false) {
  for (const [k, p] of Object.entries(profiles || {})) {
    state.profiles.set(k, p && typeof p === 'object' ? p : {});
  }
  for (const k of removed || []) state.profiles.delete(k);
  if (!quiet) changed('profiles');
}

/** The name to show for a key: our own profile, the hub's, a friend's, the message's. */
export function nameOf(key, fallback) {
  if (key === state.me && state.profile && typeof state.profile.name === 'string' && state.profile.name) {
    return state.profile.name;
  }
  const p = state.profiles.get(key);
  if (p && typeof p.name === 'string' && p.name.trim()) return p.name;
  const f = state.friends.find((x) => x.key === key);
  if (f && typeof f.name === 'string' && f.name.trim()) return f.name;
  if (typeof fallback === 'string' && fallback.trim()) return fallback;
  return typeof key === 'string' ? key.slice(0, 8) + '…' : '?';
}

export function topicNames() {
  return [...state.topics.values()].sort((a, b) => b.last() - a.last() || (a.name < b.name ? -1 : 1)).map((t) => t.name);
}

// --- direct messages ------------------------------------------------------------------

export class Conv {
  constructor(key, peer, channel) {
    this.key = key;
    this.peer = peer; // the other key (direct) or null (channel)
    this.channel = channel; // {id, name, type, members} or null
    this.msgs = new Map();
    this._sorted = null;
  }
  sorted() {
    if (!this._sorted) this._sorted = [...this.msgs.values()].sort(cmp);
    return this._sorted;
  }
  last() {
    const s = this.sorted();
    return s.length ? s[s.length - 1].date : 0;
  }
  put(m) {
    m._v = ++version;
    this.msgs.set(m.id, m);
    this._sorted = null;
  }
}

export function convKeyOf(channel, peer) {
  if (channel) return `channel:${channel.id}:${[...channel.members].sort().join(',')}`;
  return `key:${peer}`;
}

export function conv(key, peer, channel) {
  let c = state.convs.get(key);
  if (!c) {
    c = new Conv(key, peer || null, channel || null);
    state.convs.set(key, c);
    changed('convs');
  }
  return c;
}

function validDM(d) {
  return (
    d &&
    typeof d.id === 'string' &&
    typeof d.from === 'string' &&
    typeof d.to === 'string' &&
    validDate(d.date) &&
    d.message &&
    typeof d.message.type === 'string'
  );
}

function validChannel(ch) {
  return ch && typeof ch.id === 'string' && Array.isArray(ch.members) && ch.members.every((k) => typeof k === 'string');
}

/** One direct message (ours or to us), put in its conversation by id. */
export function addDM(d) {
  if (!validDM(d)) return null;
  const channel = d.channel && validChannel(d.channel) ? d.channel : null;
  const peer = d.from === state.me ? d.to : d.from;
  const c = conv(convKeyOf(channel, peer), channel ? null : peer, channel);
  c.put({ id: d.id, date: d.date, author: d.from, message: d.message, name: null, reactions: [] });
  changed('conv', c.key);
  changed('convs');
  return c;
}

/** GET /dm's answer merged in (on the first connection, or after a gap). */
export function applyConversations(list) {
  for (const c of list || []) {
    for (const d of c.messages || []) addDM(d);
  }
  state.convsLoaded = true;
  changed('convs');
}

export function applyChannels(list) {
  state.pchannels = (list || []).filter(validChannel);
  for (const ch of state.pchannels) conv(convKeyOf(ch, null), null, ch);
  changed('convs');
}

export function convTitle(c) {
  if (c.channel) return typeof c.channel.name === 'string' && c.channel.name ? c.channel.name : 'channel';
  return nameOf(c.peer);
}

export function convList() {
  return [...state.convs.values()].sort((a, b) => b.last() - a.last() || (a.key < b.key ? -1 : 1));
}

// --- read marks (per user, in localStorage) ----------------------------------------------

let marks = null;

function marksKey() {
  return `pttd.read.${state.me}`;
}

function loadMarks() {
  if (marks && marks.user === state.me) return marks;
  let m = null;
  try {
    m = JSON.parse(localStorage.getItem(marksKey()));
  } catch {
    m = null;
  }
  if (!m || typeof m !== 'object' || typeof m.base !== 'number') {
    // first time on this browser: what was written before counts as read
    m = { base: Date.now(), topics: {}, convs: {} };
  }
  // tables without a prototype: a topic named __proto__ is a key like any other
  for (const t of ['topics', 'convs']) {
    m[t] = Object.assign(Object.create(null), m[t] && typeof m[t] === 'object' ? m[t] : {});
  }
  m.user = state.me;
  marks = m;
  saveMarks();
  return m;
}

function saveMarks() {
  try {
    const { user, ...rest } = marks;
    localStorage.setItem(marksKey(), JSON.stringify(rest));
  } catch {
    /* storage full or disabled: marks last for this page only */
  }
}

// another tab read something
window.addEventListener('storage', (e) => {
  if (marks && e.key === marksKey()) {
    marks = null;
    changed('topics');
    changed('convs');
  }
});

function unreadIn(list, mark) {
  let n = 0;
  for (let i = list.length - 1; i >= 0; i--) {
    const m = list[i];
    if (m.date <= mark) break;
    if (m.author !== state.me && m.message.type !== 'action') n++;
  }
  return n;
}

export function unreadTopic(name) {
  const t = state.topics.get(name);
  if (!t || !state.me) return 0;
  const m = loadMarks();
  return unreadIn(t.sorted(), m.topics[name] ?? m.base);
}

export function unreadConv(key) {
  const c = state.convs.get(key);
  if (!c || !state.me) return 0;
  const m = loadMarks();
  return unreadIn(c.sorted(), m.convs[key] ?? m.base);
}

export function markRead(kind, key, date) {
  if (!state.me) return;
  const m = loadMarks();
  const table = kind === 'topic' ? m.topics : m.convs;
  if ((table[key] ?? m.base) >= date) return;
  table[key] = date;
  saveMarks();
  changed(kind === 'topic' ? 'topics' : 'convs');
}

export function reset() {
  state.me = null;
  state.profile = { name: '' };
  state.profiles = new Map();
  state.topics = new Map();
  state.topicsLoaded = false;
  state.convs = new Map();
  state.convsLoaded = false;
  state.friends = [];
  state.pchannels = [];
  state.hidden = new Set();
  marks = null;
}
