// One conversation on screen: a topic of the hub or a direct-message conversation.
// Messages are drawn in a window of the newest ones that grows as the reader scrolls
// up (then older pages are asked for), and kept in place by key: an update redraws only
// the messages it changed. One action bar moves to the message under the pointer or
// the keyboard focus; arrow keys walk the messages.

import { fileURL } from './api.js';
import { dayKey, fmtDay, fmtFull, fmtSize, fmtTime, h, icon, linkify, validDate } from './dom.js';
import { flushNow, msgKey, nameOf, state } from './store.js';
import { errorToast, toast } from './ui.js';

const WINDOW = 50; // messages drawn at first, and added per scroll step
const COMPACT_MS = 5 * 60_000;
const EMOJI = ['👍', '❤️', '😂', '🎉', '😮', '😢', '🙏', '👀'];
const MAX_TEXT = 32 * 1024;
const IMAGE_TYPES = new Set(['image/png', 'image/jpeg', 'image/gif', 'image/webp']);

const enc = new TextEncoder();

function validFile(v) {
  return (
    v &&
    typeof v === 'object' &&
    typeof v.key === 'string' &&
    /^[0-9a-f]{64}$/.test(v.key) &&
    typeof v.id === 'string' &&
    /^[0-9a-f]{32}$/.test(v.id) &&
    (v.secret === undefined || (typeof v.secret === 'string' && /^[0-9a-f]{64}$/.test(v.secret)))
  );
}

async function download(v) {
  try {
    const url = await fileURL(v.key, v.id, v.secret);
    const a = h('a', { href: url, download: typeof v.name === 'string' && v.name ? v.name : 'file', class: 'offscreen' });
    document.body.append(a);
    a.click();
    a.remove();
  } catch (e) {
    errorToast(e, 'Download failed');
  }
}

export class ChatView {
  /**
   * opts: {kind, id, title, subtitle (node or string), placeholder, source() -> sorted
   * messages, hasOlder(), loadOlder() -> Promise, send(text), sendFile(info),
   * upload(file, onProgress) -> {promise, abort}, react?(m, emoji), unreact?(m, id), edit?(m, text),
   * del?(m), hide?(m), markRead(date), header? (extra nodes)}
   */
  constructor(opts) {
    this.o = opts;
    this.count = WINDOW;
    this.els = new Map(); // item key -> element (with ._sig)
    this.active = null; // key of the message with the keyboard's tab stop
    this.editing = null; // {key, draft}
    this.confirming = null; // key of a message asking "delete?"
    this.picker = false;
    this.loading = false;
    this.stick = true; // keep the newest message in view
    this.firstRender = true;
    this.upload = null;

    this.list = h('ol', { class: 'msgs', 'aria-label': `Messages of ${opts.title}` });
    this.older = h('div', { class: 'older', 'aria-live': 'polite' });
    this.scroller = h('div', { class: 'scroller' }, this.older, this.list);
    this.jump = h('button', { class: 'jump', type: 'button', hidden: true, onclick: () => this.toBottom(true) }, 'New messages ↓');
    this.toolbar = h('div', { class: 'toolbar', role: 'toolbar', 'aria-label': 'Message actions' });
    this.images = new IntersectionObserver((entries) => this.showImages(entries), {
      root: this.scroller,
      rootMargin: '600px 0px',
    });

    this.composer = this.buildComposer();
    this.el = h(
      'section',
      { class: 'chat', 'aria-labelledby': 'chat-title' },
      h(
        'header',
        { class: 'chat-head' },
        h('h1', { id: 'chat-title' }, opts.title),
        opts.subtitle ? h('div', { class: 'sub' }, opts.subtitle) : null,
        opts.header || null,
      ),
      h('div', { class: 'chat-body' }, this.scroller, this.jump),
      this.composer,
    );

    this.scroller.addEventListener('scroll', () => this.onScroll(), { passive: true });
    this.list.addEventListener('mouseover', (e) => {
      const li = e.target.closest('li.msg');
      if (li && !this.picker && !this.confirming) this.attachToolbar(li);
    });
    this.list.addEventListener('focusin', (e) => {
      const li = e.target.closest('li.msg');
      if (!li) return;
      if (e.target === li) this.setActive(li.dataset.key);
      if (!this.toolbar.contains(e.target)) this.attachToolbar(li);
    });
    this.list.addEventListener('keydown', (e) => this.onKey(e));
    this.onVisible = () => this.maybeRead();
    document.addEventListener('visibilitychange', this.onVisible);
    window.addEventListener('focus', this.onVisible);
  }

  destroy() {
    this.images.disconnect();
    document.removeEventListener('visibilitychange', this.onVisible);
    window.removeEventListener('focus', this.onVisible);
    if (this.upload) this.upload.abort();
  }

  focusComposer() {
    this.input.focus();
  }

  // --- drawing ------------------------------------------------------------------------

  render() {
    const msgs = this.o.source();
    const start = Math.max(0, msgs.length - this.count);
    const items = [];
    const more = start > 0 || this.o.hasOlder();
    if (!more) {
      items.push({
        key: 'start',
        sig: msgs.length ? 's' : 'e',
        build: () => h('li', { class: 'start' }, msgs.length ? `This is the beginning of ${this.o.title}.` : 'No messages yet: say hello.'),
      });
    }
    let prev = null;
    let prevDay = null;
    for (let i = start; i < msgs.length; i++) {
      const m = msgs[i];
      const day = dayKey(m.date);
      if (day !== prevDay) {
        const label = fmtDay(m.date);
        items.push({
          key: `day:${day}`,
          sig: label,
          build: () => h('li', { class: 'day', role: 'separator' }, h('span', {}, label)),
        });
        prevDay = day;
        prev = null;
      }
      const compact =
        prev !== null &&
        prev.author === m.author &&
        m.date - prev.date < COMPACT_MS &&
        prev.message.type !== 'action' &&
        m.message.type !== 'action';
      const key = msgKey(m);
      const name = nameOf(m.author, m.name);
      const editing = this.editing && this.editing.key === key;
      items.push({
        key,
        sig: `${m._v}|${compact}|${name}|${editing}`,
        build: () => this.buildMsg(m, key, name, compact, editing),
      });
      prev = m;
    }
    this.older.textContent = this.loading ? 'Loading older messages…' : '';

    const anchor = this.stick ? null : this.anchor();
    const hadFocus = this.list.contains(document.activeElement) ? document.activeElement : null;
    this.reconcile(items);
    if (!this.els.has(this.active)) this.active = null;
    this.fixTabStop();
    if (this.toolbarFor) {
      const li = this.els.get(this.toolbarFor);
      if (!li) {
        this.toolbar.remove();
        this.toolbarFor = null;
        this.picker = false;
        this.confirming = null;
      } else if (this.picker || this.confirming) {
        // redrawn while its reaction picker or delete prompt was open (someone reacted,
        // say): put back as it was, not lost with the old element
        if (!li.contains(this.toolbar)) li.append(this.toolbar);
      } else this.attachToolbar(li);
    }
    if (hadFocus && !hadFocus.isConnected) {
      const li = this.els.get(this.active);
      if (li) li.focus({ preventScroll: true });
    }
    if (this.stick) this.toBottom(false);
    else if (anchor) this.restore(anchor);
    const newest = msgs.length ? msgs[msgs.length - 1] : null;
    if (newest && !this.stick && this.lastNewest && newest.date > this.lastNewest && newest.author !== state.me) {
      this.jump.hidden = false;
    }
    this.lastNewest = newest ? newest.date : 0;
    this.maybeRead();
    if (this.firstRender && msgs.length) {
      this.firstRender = false;
      performance.mark('pttd:first-render');
    }
    // not enough to scroll: draw (or fetch) more at once
    if (more && this.scroller.scrollHeight <= this.scroller.clientHeight + 50) {
      requestAnimationFrame(() => this.more());
    }
  }

  reconcile(items) {
    const keep = new Set();
    let cursor = this.list.firstChild;
    for (const it of items) {
      keep.add(it.key);
      let el = this.els.get(it.key);
      if (!el || el._sig !== it.sig) {
        const fresh = it.build();
        fresh._sig = it.sig;
        if (el) {
          if (el === cursor) cursor = el.nextSibling;
          el.replaceWith(fresh);
          this.forget(el);
        }
        el = fresh;
        this.els.set(it.key, el);
      }
      if (el === cursor) {
        cursor = cursor.nextSibling;
      } else {
        this.list.insertBefore(el, cursor);
      }
    }
    for (const [key, el] of this.els) {
      if (!keep.has(key)) {
        el.remove();
        this.forget(el);
        this.els.delete(key);
      }
    }
  }

  forget(el) {
    for (const img of el.querySelectorAll('img[data-file]')) this.images.unobserve(img);
  }

  anchor() {
    // a message, never a day separator: its key names a day, and the one drawn at the
    // top moves to the new top when older messages of that day come in (the view then
    // jumped to the oldest drawn message and loaded no more)
    const top = this.scroller.scrollTop;
    for (const el of this.list.children) {
      if (el.classList.contains('msg') && el.offsetTop + el.offsetHeight > top) {
        return { el, key: el.dataset.key, delta: el.offsetTop - top };
      }
    }
    return null;
  }

  restore(a) {
    // by its key: the message may be drawn anew (compact once its author's older
    // message comes in above it)
    const el = this.els.get(a.key) || (a.el.isConnected ? a.el : null);
    if (el) this.scroller.scrollTop = el.offsetTop - a.delta;
  }

  toBottom(smooth) {
    this.scroller.scrollTop = this.scroller.scrollHeight;
    this.stick = true;
    this.jump.hidden = true;
    if (smooth) this.maybeRead();
  }

  onScroll() {
    const s = this.scroller;
    this.stick = s.scrollHeight - s.scrollTop - s.clientHeight < 40;
    if (this.stick) {
      this.jump.hidden = true;
      this.maybeRead();
    }
    if (s.scrollTop < 400) this.more();
  }

  async more() {
    if (this.loading) return;
    const msgs = this.o.source();
    if (msgs.length > this.count) {
      this.count += WINDOW;
      this.render();
      return;
    }
    if (!this.o.hasOlder()) return;
    this.loading = true;
    this.render();
    try {
      await this.o.loadOlder();
      this.count += WINDOW;
    } catch (e) {
      errorToast(e, 'Older messages could not be loaded');
    } finally {
      this.loading = false;
      flushNow();
      this.render();
    }
  }

  maybeRead() {
    if (document.visibilityState !== 'visible' || !this.stick || !this.el.isConnected) return;
    const msgs = this.o.source();
    if (msgs.length) this.o.markRead(msgs[msgs.length - 1].date);
  }

  // --- one message -------------------------------------------------------------------

  buildMsg(m, key, name, compact, editing) {
    const mine = m.author === state.me;
    const type = m.message.type;
    const li = h('li', {
      class: `msg${compact ? ' compact' : ''}${mine ? ' mine' : ''}${type === 'action' ? ' action' : ''}`,
      tabindex: '-1',
      dataset: { key },
      'aria-label': `${name}, ${fmtFull(m.date)}`,
    });
    const time = h(
      'time',
      { datetime: validDate(m.date) ? new Date(m.date).toISOString() : '', title: fmtFull(m.date) },
      fmtTime(m.date),
    );
    if (type === 'action') {
      li.append(h('div', { class: 'body' }, h('span', { class: 'author' }, name), ' ', this.actionText(m), ' · ', time));
      return li;
    }
    li.append(
      h(
        'div',
        { class: 'meta' },
        h('span', { class: 'author', title: m.author }, name),
        ' ',
        time,
        m.edited ? h('span', { class: 'edited', title: `edited ${fmtFull(m.edited)}` }, ' (edited)') : null,
      ),
    );
    if (editing) li.append(this.editor(m));
    else li.append(this.body(m));
    const reactions = this.reactions(m);
    if (reactions) li.append(reactions);
    return li;
  }

  actionText(m) {
    const v = m.message.value;
    return typeof v === 'string' ? v : '';
  }

  body(m) {
    const { type, value } = m.message;
    if (type === 'text' && typeof value === 'string') return h('div', { class: 'body text' }, linkify(value));
    if (type === 'file' && validFile(value)) return h('div', { class: 'body' }, this.file(value));
    return h('div', { class: 'body unsupported' }, `(a message of type “${type}” that this page cannot show)`);
  }

  file(v) {
    const name = typeof v.name === 'string' && v.name ? v.name : 'file';
    const size = Number.isFinite(v.size) ? fmtSize(v.size) : '';
    const link = h(
      'a',
      {
        href: '#',
        class: 'file',
        onclick: (e) => {
          e.preventDefault();
          download(v);
        },
      },
      icon('file'),
      h('span', { class: 'file-name' }, name),
      size ? h('span', { class: 'file-size' }, size) : null,
    );
    if (!IMAGE_TYPES.has(v.type)) return link;
    const img = h('img', { alt: name, class: 'inline', dataset: { file: `${v.key}/${v.id}`, secret: v.secret || '' } });
    img.addEventListener('load', () => {
      img.classList.add('loaded');
      if (this.stick) this.toBottom(false);
    });
    img.addEventListener('error', () => img.replaceWith(link));
    this.images.observe(img);
    return h('figure', { class: 'image' }, img, h('figcaption', {}, link));
  }

  showImages(entries) {
    for (const e of entries) {
      if (!e.isIntersecting) continue;
      const img = e.target;
      this.images.unobserve(img);
      const [key, id] = img.dataset.file.split('/');
      fileURL(key, id, img.dataset.secret || undefined).then(
        (url) => (img.src = url),
        () => img.replaceWith(h('span', { class: 'unsupported' }, `${img.alt} (could not be fetched)`)),
      );
    }
  }

  reactions(m) {
    if (!Array.isArray(m.reactions) || !m.reactions.length) return null;
    const groups = new Map();
    const own = new Map(); // emoji -> the id of the user's own reaction with it
    for (const r of m.reactions) {
      if (!r || typeof r.emoji !== 'string' || !r.emoji) continue;
      if (!groups.has(r.emoji)) groups.set(r.emoji, []);
      groups.get(r.emoji).push(r.author);
      if (r.author === state.me && typeof r.id === 'string') own.set(r.emoji, r.id);
    }
    if (!groups.size) return null;
    return h(
      'div',
      { class: 'reactions' },
      [...groups].map(([emoji, who]) => {
        const mine = who.includes(state.me);
        const names = who.map((k) => nameOf(k)).join(', ');
        return h(
          'button',
          {
            type: 'button',
            class: `reaction${mine ? ' mine' : ''}`,
            'aria-pressed': mine ? 'true' : 'false',
            title: names,
            'aria-label': `${emoji} ${who.length}: ${names}${mine ? ' (yours: press to take it back)' : ''}`,
            onclick: () => {
              if (!mine && this.o.react) this.o.react(m, emoji);
              else if (mine && own.has(emoji) && this.o.unreact) this.o.unreact(m, own.get(emoji));
            },
          },
          h('span', { class: 'emoji' }, emoji),
          h('span', { class: 'count' }, String(who.length)),
        );
      }),
      Number.isFinite(m.reactions_total) && m.reactions_total > m.reactions.length
        ? h('span', { class: 'more' }, `+${m.reactions_total - m.reactions.length}`)
        : null,
    );
  }

  // --- editing -----------------------------------------------------------------------

  editor(m) {
    const key = msgKey(m);
    const ta = h('textarea', { class: 'edit', 'aria-label': 'Edit the message', rows: 2 });
    ta.value = this.editing.draft;
    ta.addEventListener('input', () => (this.editing.draft = ta.value));
    ta.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.saveEdit(m);
      } else if (e.key === 'Escape') {
        e.preventDefault();
        e.stopPropagation();
        this.stopEdit(key);
      }
    });
    requestAnimationFrame(() => {
      if (ta.isConnected && this.editing && this.editing.key === key && !this.editing.focused) {
        this.editing.focused = true;
        ta.focus();
        ta.setSelectionRange(ta.value.length, ta.value.length);
      }
    });
    return h(
      'div',
      { class: 'body editing' },
      ta,
      h(
        'div',
        { class: 'row' },
        h('button', { type: 'button', class: 'primary', onclick: () => this.saveEdit(m) }, 'Save'),
        h('button', { type: 'button', onclick: () => this.stopEdit(key) }, 'Cancel'),
        h('span', { class: 'hint' }, 'Enter to save · Esc to cancel'),
      ),
    );
  }

  startEdit(m) {
    if (!this.o.edit || m.author !== state.me || m.message.type !== 'text') return;
    this.editing = { key: msgKey(m), draft: m.message.value, focused: false };
    this.toolbar.remove();
    this.render();
  }

  stopEdit(key) {
    this.editing = null;
    this.render();
    const li = this.els.get(key);
    if (li) {
      this.setActive(key);
      li.focus();
    }
  }

  async saveEdit(m) {
    const key = msgKey(m);
    const text = this.editing ? this.editing.draft : '';
    if (!text.trim()) {
      toast('A message cannot be empty: delete it instead.', 'error');
      return;
    }
    if (text === m.message.value) {
      this.stopEdit(key);
      return;
    }
    try {
      await this.o.edit(m, text);
      this.stopEdit(key);
    } catch (e) {
      errorToast(e, 'The message was not edited');
    }
  }

  // --- the action bar ----------------------------------------------------------------

  attachToolbar(li) {
    const key = li.dataset.key;
    if (this.editing && this.editing.key === key) return;
    const m = this.find(key);
    if (!m || m.message.type === 'action') {
      this.toolbar.remove();
      this.toolbarFor = null;
      return;
    }
    if (this.toolbarFor !== key || !li.contains(this.toolbar)) {
      this.toolbarFor = key;
      this.picker = false;
      this.confirming = null;
      this.fillToolbar(m);
      li.append(this.toolbar);
    }
  }

  find(key) {
    for (const m of this.o.source()) if (msgKey(m) === key) return m;
    return null;
  }

  fillToolbar(m) {
    const t = this.toolbar;
    while (t.firstChild) t.firstChild.remove();
    const mine = m.author === state.me;
    const btn = (label, title, fn, cls = '') =>
      h('button', { type: 'button', class: `tool ${cls}`, title, 'aria-label': title, onclick: fn }, label);
    if (this.o.react) t.append(btn(icon('smile'), 'Add a reaction', () => this.openPicker(m), 'react'));
    if (this.o.edit && mine && m.message.type === 'text') t.append(btn(icon('edit'), 'Edit', () => this.startEdit(m), 'edit'));
    if (this.o.del && mine) t.append(btn(icon('trash'), 'Delete', () => this.askDelete(m), 'delete'));
    if (this.o.hide && !mine) t.append(btn(icon('hide'), 'Hide this message (for you)', () => this.hide(m), 'hide'));
  }

  openPicker(m) {
    this.picker = true;
    const t = this.toolbar;
    while (t.firstChild) t.firstChild.remove();
    const close = () => {
      this.picker = false;
      this.fillToolbar(m);
      const r = t.querySelector('.react');
      if (r) r.focus();
    };
    const buttons = EMOJI.map((emoji) =>
      h(
        'button',
        {
          type: 'button',
          class: 'tool emoji-choice',
          'aria-label': `React with ${emoji}`,
          onclick: () => {
            this.picker = false;
            this.fillToolbar(m);
            this.o.react(m, emoji);
            const li = this.els.get(msgKey(m));
            if (li) li.focus();
          },
        },
        emoji,
      ),
    );
    const picker = h(
      'div',
      {
        class: 'picker',
        role: 'group',
        'aria-label': 'Pick a reaction',
        onkeydown: (e) => {
          const i = buttons.indexOf(document.activeElement);
          if (e.key === 'Escape') {
            e.preventDefault();
            e.stopPropagation();
            close();
          } else if (e.key === 'ArrowRight' || e.key === 'ArrowLeft') {
            e.preventDefault();
            e.stopPropagation();
            const n = (i + (e.key === 'ArrowRight' ? 1 : buttons.length - 1)) % buttons.length;
            buttons[n].focus();
          }
        },
      },
      buttons,
      h('button', { type: 'button', class: 'tool', 'aria-label': 'Close', onclick: close }, icon('close')),
    );
    t.append(picker);
    buttons[0].focus();
  }

  askDelete(m) {
    const t = this.toolbar;
    this.confirming = msgKey(m);
    while (t.firstChild) t.firstChild.remove();
    const cancel = h(
      'button',
      {
        type: 'button',
        class: 'tool',
        onclick: () => {
          this.confirming = null;
          this.fillToolbar(m);
          const d = t.querySelector('.delete');
          if (d) d.focus();
        },
      },
      'Cancel',
    );
    t.onkeydown = (e) => {
      if (e.key === 'Escape' && this.confirming) {
        e.preventDefault();
        e.stopPropagation();
        cancel.click();
      }
    };
    t.append(
      h('span', { class: 'confirm' }, 'Delete this message?'),
      h(
        'button',
        {
          type: 'button',
          class: 'tool danger confirm-delete',
          onclick: async () => {
            this.confirming = null;
            try {
              await this.o.del(m);
              this.refocus();
            } catch (e) {
              errorToast(e, 'The message was not deleted');
            }
          },
        },
        'Delete',
      ),
      cancel,
    );
    cancel.focus();
  }

  /** After the focused message went away: the list's tab stop, else the composer. */
  refocus() {
    flushNow();
    const li = this.els.get(this.active) || this.tabStop;
    if (li && li.isConnected) li.focus();
    else this.focusComposer();
  }

  async hide(m) {
    try {
      await this.o.hide(m);
      this.refocus();
      toast('Hidden for you.');
    } catch (e) {
      errorToast(e, 'The message was not hidden');
    }
  }

  // --- keyboard ----------------------------------------------------------------------

  setActive(key) {
    this.active = key;
    this.fixTabStop();
  }

  fixTabStop() {
    const msgs = [...this.list.querySelectorAll(':scope > li.msg')];
    let stop = this.active ? this.els.get(this.active) : null;
    if (!stop) stop = msgs[msgs.length - 1] || null;
    if (this.tabStop && this.tabStop !== stop) this.tabStop.tabIndex = -1;
    if (stop) stop.tabIndex = 0;
    this.tabStop = stop;
  }

  onKey(e) {
    if (e.target.tagName === 'TEXTAREA' || e.target.tagName === 'INPUT') return;
    const li = e.target.closest('li.msg');
    if (e.key === 'Escape') {
      if (this.picker || this.confirming) return;
      e.preventDefault();
      this.focusComposer();
      return;
    }
    if (!li || e.target !== li) return;
    const msgs = [...this.list.querySelectorAll(':scope > li.msg')];
    const i = msgs.indexOf(li);
    let next = null;
    if (e.key === 'ArrowUp') next = msgs[i - 1];
    else if (e.key === 'ArrowDown') next = msgs[i + 1];
    else if (e.key === 'Home') next = msgs[0];
    else if (e.key === 'End') next = msgs[msgs.length - 1];
    else if (e.key === 'PageUp') next = msgs[Math.max(0, i - 10)];
    else if (e.key === 'PageDown') next = msgs[Math.min(msgs.length - 1, i + 10)];
    else if (e.key === 'e' || e.key === 'F2') {
      const m = this.find(li.dataset.key);
      if (m) this.startEdit(m);
      return;
    } else return;
    e.preventDefault();
    if (!next && e.key === 'ArrowUp') this.more();
    if (next) {
      this.setActive(next.dataset.key);
      next.focus();
      next.scrollIntoView({ block: 'nearest' });
    }
  }

  // --- composing ---------------------------------------------------------------------

  buildComposer() {
    const o = this.o;
    const input = h('textarea', {
      class: 'input',
      rows: 1,
      placeholder: o.placeholder || 'Message',
      'aria-label': o.placeholder || 'Message',
      maxlength: MAX_TEXT,
    });
    this.input = input;
    const file = h('input', { type: 'file', class: 'offscreen', tabindex: '-1', 'aria-hidden': 'true' });
    const progress = h('progress', { max: 1, value: 0 });
    const upName = h('span', { class: 'up-name' });
    const upCancel = h('button', { type: 'button', class: 'tool', 'aria-label': 'Cancel the upload' }, icon('close'));
    const up = h('div', { class: 'upload', hidden: true, role: 'status' }, upName, progress, upCancel);
    this.uploadBar = { up, progress, upName };
    const grow = () => {
      input.style.height = 'auto';
      input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
    };
    input.addEventListener('input', grow);
    input.addEventListener('keydown', (e) => {
      if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        send();
      } else if (e.key === 'ArrowUp' && !input.value && o.edit) {
        const mine = [...o.source()].reverse().find((m) => m.author === state.me && m.message.type === 'text');
        if (mine) {
          e.preventDefault();
          this.startEdit(mine);
        }
      } else if (e.key === 'Escape' && !input.value) {
        const li = this.els.get(this.active) || this.tabStop;
        if (li) {
          e.preventDefault();
          li.focus();
        }
      }
    });
    input.addEventListener('paste', (e) => {
      const f = e.clipboardData && e.clipboardData.files && e.clipboardData.files[0];
      if (f) {
        e.preventDefault();
        this.sendFile(f);
      }
    });
    const send = async () => {
      const text = input.value;
      if (!text.trim()) return;
      if (enc.encode(text).length > MAX_TEXT) {
        toast('This message is too long (32 KB at most): attach it as a file.', 'error');
        return;
      }
      input.value = '';
      grow();
      try {
        await o.send(text);
        this.toBottom(false);
      } catch (e) {
        if (!input.value) {
          input.value = text;
          grow();
        }
        errorToast(e, 'Not sent');
      }
    };
    file.addEventListener('change', () => {
      const f = file.files && file.files[0];
      file.value = '';
      if (f) this.sendFile(f);
    });
    upCancel.addEventListener('click', () => {
      if (this.upload) this.upload.abort();
    });
    const attach = h(
      'button',
      {
        type: 'button',
        class: 'attach',
        title: 'Attach a file',
        'aria-label': 'Attach a file',
        onclick: () => file.click(),
      },
      icon('attach'),
    );
    return h(
      'form',
      {
        class: 'composer',
        onsubmit: (e) => {
          e.preventDefault();
          send();
        },
      },
      up,
      h('div', { class: 'row' }, attach, file, input, h('button', { type: 'submit', class: 'send primary' }, 'Send')),
      h('p', { class: 'hint' }, 'Enter to send · Shift+Enter for a new line · Esc to the messages'),
    );
  }

  async sendFile(f) {
    if (this.upload) {
      toast('One upload at a time: wait for this one to finish.', 'error');
      return;
    }
    const max = state.info && state.info.max_file;
    if (max && f.size > max) {
      toast(`${f.name} is too large (${fmtSize(f.size)}; this gateway takes ${fmtSize(max)} at most).`, 'error');
      return;
    }
    if (!f.size) {
      toast(`${f.name} is empty.`, 'error');
      return;
    }
    const { up, progress, upName } = this.uploadBar;
    upName.textContent = `${f.name} (${fmtSize(f.size)})`;
    progress.value = 0;
    up.hidden = false;
    this.upload = this.o.upload(f, (sent, total) => {
      progress.value = total ? sent / total : 0;
    });
    try {
      const info = await this.upload.promise;
      progress.value = 1;
      const sent = { id: info.id, key: info.key, name: info.name, size: info.size, type: info.type };
      if (info.secret) sent.secret = info.secret; // sealed: the key rides in the encrypted message
      await this.o.sendFile(sent);
      this.toBottom(false);
    } catch (e) {
      errorToast(e, `${f.name} was not sent`);
    } finally {
      this.upload = null;
      up.hidden = true;
    }
  }
}
