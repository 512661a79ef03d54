// The page: boot (GET /gateway.json, a provider's login answer, the stored session),
// the login screen or the chat (sidebar of topics and conversations, one view at a
// time chosen by the URL's #fragment), and the two live streams: the hub's (topics,
// reactions, moderation, profiles) and the gateway's (direct messages, and this
// gateway's posts at once, before the hub has synced them).

import * as api from './api.js';
import { ChatView } from './chatview.js';
import { clear, h, icon, validTopic } from './dom.js';
import { loginView, oidcReturn } from './login.js';
import { addFriend, peopleView } from './people.js';
import {
  PAGE,
  addDM,
  addOlder,
  applyChannels,
  applyConversations,
  applyPost,
  applyProfiles,
  applySnapshot,
  applyUpdate,
  changed,
  conv,
  convList,
  convTitle,
  markRead,
  msgKey,
  nameOf,
  on,
  reset,
  state,
  topic,
  topicNames,
  unreadConv,
  unreadTopic,
} from './store.js';
import { Stream } from './streams.js';
import { errorToast, toast } from './ui.js';

const root = document.getElementById('root');
let info = null;
let streams = [];
let view = null; // the ChatView on screen, if any
let current = null; // the route on screen
let unsubs = [];
const down = new Set();
let hubURL = null;

const enc = encodeURIComponent;

// --- boot ---------------------------------------------------------------------------------

async function boot() {
  performance.mark('pttd:boot'); // the modules are loaded
  try {
    info = await api.publicCall('GET', 'gateway.json');
  } catch (e) {
    clear(root);
    root.append(
      h(
        'main',
        { class: 'login' },
        h('h1', {}, 'pttd chat'),
        h('p', { class: 'status', role: 'alert' }, `The gateway cannot be reached (${e.message}).`),
        h('button', { type: 'button', onclick: () => location.reload() }, 'Try again'),
      ),
    );
    return;
  }
  state.info = info;
  hubURL = typeof info.hub === 'string' && /^https?:\/\//.test(info.hub) ? info.hub.replace(/\/+$/, '') : null;
  api.onSession((s, why) => {
    if (!s) {
      stop();
      const msg = {
        expired: 'Your session has ended: log in again.',
        elsewhere: 'You were logged out in another tab.',
      }[why];
      showLogin(msg);
    } else if (why === 'login') {
      start();
    }
  });
  const answer = oidcReturn();
  if (answer) {
    try {
      api.setSession(await answer);
      return;
    } catch (e) {
      showLogin(e.message);
      return;
    }
  }
  if (api.getSession()) start();
  else showLogin();
}

function showLogin(message) {
  clear(root);
  document.title = 'pttd chat: log in';
  root.append(loginView(info, message));
  const first = root.querySelector('input');
  if (first) first.focus();
}

function stop() {
  for (const s of streams) s.stop();
  streams = [];
  for (const u of unsubs) u();
  unsubs = [];
  if (view) view.destroy();
  view = null;
  current = null;
  down.clear();
  window.removeEventListener("hashchange", route);
  shell = null;
}

// --- the chat --------------------------------------------------------------------------------

let shell = null;

function start() {
  stop();
  reset();
  state.info = info;
  state.me = api.getSession().key;
  buildShell();
  unsubs.push(
    on('topics', drawTopics),
    on('convs', () => {
      drawConvs();
      // a conversation opened by its address before it was known (a reload on a private
      // channel, say): shown once it is
      if (current && current.kind === 'conv' && !view) route();
    }),
    on('profiles', () => {
      drawTopics();
      drawConvs();
      drawMe();
      if (view) view.render();
    }),
    on('profile', drawMe),
    on('friends', drawConvs),
    on('topic', (names) => {
      if (current && current.kind === 'topic' && names.has(current.id) && view) view.render();
      if (current && current.kind === 'none') route();
    }),
    on('conv', (keys) => {
      if (current && current.kind === 'conv' && keys.has(current.id) && view) view.render();
    }),
  );
  window.addEventListener('hashchange', route);
  load();
  openStreams();
  route();
}

async function load(attempt = 0) {
  const tries = [
    api.call('GET', 'profile').then((p) => {
      state.profile = p && typeof p === 'object' ? p : { name: '' };
      changed('profile');
      changed('profiles');
    }),
    api.call('GET', 'friends').then((f) => {
      state.friends = Array.isArray(f) ? f.filter((x) => x && typeof x.key === 'string') : [];
      changed('friends');
    }),
    api.call('GET', 'pchannels').then((c) => applyChannels(Array.isArray(c) ? c : [])),
  ];
  if (!hubURL) tries.push(loadGatewayTopics());
  const results = await Promise.allSettled(tries);
  const failed = results.find((r) => r.status === 'rejected');
  if (!failed || !api.getSession()) return;
  const e = failed.reason;
  // logged in with one's own key: the gateway has not synced the repository yet
  if (e && e.status === 404 && /no version yet/.test(e.message) && attempt < 20) {
    if (attempt === 0) toast('Your repository is being fetched from your node: this may take a moment.');
    setTimeout(() => {
      if (api.getSession() && shell) load(attempt + 1);
    }, 3000);
    return;
  }
  errorToast(e, 'Loading failed');
}

/** Without a hub: the topics this user wrote to, from the gateway (own posts only). */
async function loadGatewayTopics() {
  const names = await api.call('GET', 'topics');
  for (const n of names) {
    const posts = await api.call('GET', `topics/${enc(n)}?limit=${PAGE}`);
    for (const p of posts) applyPost({ action: 'new', author: state.me, topic: n, post: p });
    topic(n).hasOlder = posts.length >= PAGE;
  }
  state.topicsLoaded = true;
  changed('topics');
  if (current && current.kind === 'none') route();
}

async function loadDMs() {
  try {
    applyConversations(await api.call('GET', 'dm'));
  } catch (e) {
    if (api.getSession()) errorToast(e, 'Direct messages could not be loaded');
  }
}

function openStreams() {
  const gw = new Stream({
    name: 'gateway',
    url: async (last) => `events?token=${enc(await api.token())}${last ? `&lastEventId=${enc(last)}` : ''}`,
    events: {
      post: (ev) => applyPost(ev),
      dm: (d) => {
        const c = addDM(d);
        if (c && d.from !== state.me && !(current && current.kind === 'conv' && current.id === c.key && document.hasFocus())) {
          toast(`New message from ${nameOf(d.from)}`);
        }
      },
      reset: () => {
        loadDMs();
        if (!hubURL) loadGatewayTopics().catch(() => {});
      },
    },
    onState: (up) => setDown('gateway', !up),
    // opened without a last id (the first time, or before any event came): what was
    // sent before is read whole, so nothing between two streams is missed
    onOpen: (resumed) => {
      if (!resumed) loadDMs();
    },
    // is the token still good? (a 401 renews it, or ends the session)
    beforeRetry: () => api.call('GET', 'me'),
  });
  streams.push(gw);
  gw.start();
  if (hubURL) {
    const hub = new Stream({
      name: 'hub',
      url: async (last) => `${hubURL}/events?reader=${enc(state.me)}${last ? `&lastEventId=${enc(last)}` : ''}`,
      events: {
        snapshot: (s) => {
          performance.mark('pttd:snapshot');
          applySnapshot(s);
        },
        update: (u) => applyUpdate(u),
        profiles: (p) => applyProfiles(p.profiles, p.removed),
      },
      onState: (up) => setDown('hub', !up),
    });
    streams.push(hub);
    hub.start();
  }
}

function setDown(name, isDown) {
  if (isDown) down.add(name);
  else down.delete(name);
  if (!shell) return;
  const b = shell.banner;
  if (!down.size) {
    b.hidden = true;
    b.textContent = '';
    return;
  }
  const what = [...down].map((n) => (n === 'hub' ? 'the hub (topics)' : 'the gateway (messages)')).join(' and ');
  b.textContent = `Disconnected from ${what}: reconnecting… Nothing is lost: what was missed arrives once back.`;
  b.hidden = false;
}

// --- the shell -----------------------------------------------------------------------------

function buildShell() {
  clear(root);
  const banner = h('div', { id: 'banner', class: 'banner', role: 'alert', hidden: true });
  const menu = h(
    'button',
    { type: 'button', id: 'menu', class: 'menu', 'aria-label': 'Topics and conversations', 'aria-expanded': 'false', 'aria-controls': 'sidebar' },
    icon('menu'),
  );
  const title = h('span', { class: 'topbar-title' });
  const topics = h('ul', { id: 'topic-list', class: 'nav-list', 'aria-labelledby': 'topics-h' });
  const convs = h('ul', { id: 'conv-list', class: 'nav-list', 'aria-labelledby': 'dms-h' });
  const newName = h('input', {
    id: 'new-topic-name',
    'aria-label': 'New topic name',
    placeholder: 'topic-name',
    maxlength: 64,
    autocomplete: 'off',
    spellcheck: 'false',
  });
  const newForm = h(
    'form',
    {
      class: 'new-topic',
      hidden: true,
      onsubmit: async (e) => {
        e.preventDefault();
        const name = newName.value.trim();
        if (!validTopic(name)) {
          toast('A topic name is 1-64 of letters, digits, _ . - (not starting with . or -).', 'error');
          return;
        }
        try {
          const res = await api.call('POST', 'topics', name);
          applyPost({ action: 'new', author: state.me, topic: res.id, post: res.post });
          newName.value = '';
          newForm.hidden = true;
          go(`#/topic/${enc(res.id)}`);
        } catch (err) {
          errorToast(err, 'The topic was not created');
        }
      },
      onkeydown: (e) => {
        if (e.key === 'Escape') {
          newForm.hidden = true;
          addBtn.focus();
        }
      },
    },
    newName,
    h('button', { type: 'submit' }, 'Create'),
  );
  const addBtn = h(
    'button',
    {
      type: 'button',
      id: 'new-topic',
      class: 'icon',
      'aria-label': 'New topic',
      title: 'New topic',
      onclick: () => {
        newForm.hidden = !newForm.hidden;
        if (!newForm.hidden) newName.focus();
      },
    },
    '+',
  );
  const meName = h('span', { class: 'me-name' });
  const sidebar = h(
    'nav',
    { id: 'sidebar', class: 'sidebar', 'aria-label': 'Topics and conversations' },
    h('div', { class: 'brand' }, 'pttd chat'),
    h('div', { class: 'side-head' }, h('h2', { id: 'topics-h' }, 'Topics'), addBtn),
    newForm,
    topics,
    h('div', { class: 'side-head' }, h('h2', { id: 'dms-h' }, 'Direct messages')),
    convs,
    h(
      'div',
      { class: 'side-foot' },
      h('a', { href: '#/people', id: 'people-link' }, 'People & profile'),
      h('div', { class: 'me' }, meName, h('button', { type: 'button', id: 'logout', onclick: () => api.logout() }, 'Log out')),
    ),
  );
  const main = h('main', { id: 'main', class: 'main', tabindex: '-1' });
  const app = h(
    'div',
    { class: 'app' },
    banner,
    h('header', { class: 'topbar' }, menu, title),
    h('div', { class: 'columns' }, sidebar, main),
  );
  menu.addEventListener('click', () => setNav(!app.classList.contains('nav-open')));
  sidebar.addEventListener('keydown', (e) => {
    if (e.key === 'Escape' && app.classList.contains('nav-open')) {
      setNav(false);
      menu.focus();
    }
  });
  root.append(app);
  shell = { app, banner, menu, title, topics, convs, main, meName, sidebar };
  drawTopics();
  drawConvs();
  drawMe();
}

function setNav(open) {
  shell.app.classList.toggle('nav-open', open);
  shell.menu.setAttribute('aria-expanded', String(open));
  if (open) {
    const a = shell.sidebar.querySelector('a[aria-current="page"]') || shell.sidebar.querySelector('a, button');
    if (a) a.focus();
  }
}

function go(hash) {
  if (location.hash === hash) route();
  else location.hash = hash;
}

function drawMe() {
  if (!shell) return;
  shell.meName.textContent = nameOf(state.me);
  shell.meName.title = state.me;
}

function keepFocus(list, draw) {
  const f = list.contains(document.activeElement) ? document.activeElement.getAttribute('href') : null;
  draw();
  if (f) {
    for (const a of list.querySelectorAll('a')) if (a.getAttribute('href') === f) a.focus();
  }
}

function badge(n) {
  return n ? h('span', { class: 'badge', 'aria-label': `${n} unread` }, n > 99 ? '99+' : String(n)) : null;
}

function drawTopics() {
  if (!shell) return;
  const list = shell.topics;
  keepFocus(list, () => {
    clear(list);
    const names = topicNames();
    if (!names.length) {
      list.append(h('li', { class: 'hint' }, state.topicsLoaded || !hubURL ? 'No topics yet.' : 'Loading…'));
    }
    for (const n of names) {
      const href = `#/topic/${enc(n)}`;
      const here = current && current.kind === 'topic' && current.id === n;
      const u = here ? 0 : unreadTopic(n);
      list.append(
        h(
          'li',
          {},
          h(
            'a',
            { href, class: u ? 'unread' : '', 'aria-current': here ? 'page' : null, dataset: { topic: n } },
            h('span', { class: 'label' }, `# ${n}`),
            badge(u),
          ),
        ),
      );
    }
  });
  drawTitle();
}

function drawConvs() {
  if (!shell) return;
  const list = shell.convs;
  keepFocus(list, () => {
    clear(list);
    const convs = convList();
    if (!convs.length) list.append(h('li', { class: 'hint' }, 'None yet: start one from People.'));
    for (const c of convs) {
      const href = `#/dm/${enc(c.key)}`;
      const here = current && current.kind === 'conv' && current.id === c.key;
      const u = here ? 0 : unreadConv(c.key);
      list.append(
        h(
          'li',
          {},
          h(
            'a',
            { href, class: u ? 'unread' : '', 'aria-current': here ? 'page' : null, dataset: { conv: c.key } },
            h('span', { class: 'label' }, c.channel ? `≡ ${convTitle(c)}` : `@ ${convTitle(c)}`),
            badge(u),
          ),
        ),
      );
    }
  });
  drawTitle();
}

function drawTitle() {
  let n = 0;
  for (const name of state.topics.keys()) if (!(current && current.kind === 'topic' && current.id === name)) n += unreadTopic(name);
  for (const key of state.convs.keys()) if (!(current && current.kind === 'conv' && current.id === key)) n += unreadConv(key);
  const here = current && current.title ? `${current.title} · ` : '';
  document.title = `${n ? `(${n}) ` : ''}${here}pttd chat`;
}

// --- routes ---------------------------------------------------------------------------------

function decoded(s) {
  try {
    return decodeURIComponent(s);
  } catch {
    return null; // not percent-encoding (#/topic/%E0): routed as no topic
  }
}

function route() {
  if (!shell) return;
  const hash = location.hash;
  let m;
  let next;
  if ((m = /^#\/topic\/(.+)$/.exec(hash)) && decoded(m[1]) !== null) next = { kind: 'topic', id: decoded(m[1]) };
  else if ((m = /^#\/dm\/(.+)$/.exec(hash)) && decoded(m[1]) !== null) next = { kind: 'conv', id: decoded(m[1]) };
  else if (hash === '#/people') next = { kind: 'people', id: '' };
  else {
    const names = topicNames();
    if (names.length) {
      history.replaceState(null, '', `#/topic/${enc(names[0])}`);
      next = { kind: 'topic', id: names[0] };
    } else if (state.topicsLoaded) {
      history.replaceState(null, '', '#/people');
      next = { kind: 'people', id: '' };
    } else {
      next = { kind: 'none', id: '' };
    }
  }
  if (current && current.kind === next.kind && current.id === next.id && view) return;
  if (view) view.destroy();
  view = null;
  current = next;
  const main = shell.main;
  clear(main);
  setNav(false);
  if (next.kind === 'topic') showTopic(next.id);
  else if (next.kind === 'conv') showConv(next.id);
  else if (next.kind === 'people') {
    current.title = 'People';
    main.append(peopleView(go));
  } else main.append(h('p', { class: 'loading' }, 'Loading…'));
  shell.title.textContent = current.title || '';
  drawTopics();
  drawConvs();
  if (view && window.matchMedia('(min-width: 701px)').matches) view.focusComposer();
  else main.focus({ preventScroll: true });
}

function showTopic(name) {
  if (!validTopic(name)) {
    shell.main.append(h('p', { class: 'loading' }, 'There is no such topic.'));
    return;
  }
  current.title = `#${name}`;
  const t = () => state.topics.get(name);
  const path = `topics/${enc(name)}`;
  view = new ChatView({
    kind: 'topic',
    id: name,
    title: `#${name}`,
    placeholder: `Message #${name}`,
    source: () => (t() ? t().sorted() : []),
    hasOlder: () => !!(t() && t().hasOlder),
    loadOlder: async () => {
      const tp = t();
      const before = tp.oldest();
      let page;
      if (hubURL) {
        const r = await fetch(`${hubURL}/topics/${enc(name)}?before=${before}&limit=${PAGE}&reader=${enc(state.me)}`);
        const body = await r.json().catch(() => null);
        if (!r.ok || !body) throw new Error((body && body.error) || `the hub answered ${r.status}`);
        page = body.result;
      } else {
        page = (await api.call('GET', `${path}?before=${before}&limit=${PAGE}`)).map((p) => ({ ...p, author: state.me }));
      }
      addOlder(tp, page, PAGE);
    },
    send: async (text) => {
      const p = await api.call('POST', path, text);
      applyPost({ action: 'new', author: state.me, topic: name, post: p });
    },
    sendFile: async (file) => {
      const p = await api.call('POST', path, { type: 'file', value: file });
      applyPost({ action: 'new', author: state.me, topic: name, post: p });
    },
    upload: (f, progress) => api.upload(f, progress),
    react: async (m, emoji) => {
      try {
        const r = await api.call('POST', `${path}/reactions`, { msgID: m.id, emoji, author: m.author });
        const tp = t();
        const cur = tp && tp.msgs.get(msgKey(m));
        if (cur && !cur.reactions.some((x) => x.id === r.id)) {
          tp.put({ ...cur, reactions: [...cur.reactions, { id: r.id, author: state.me, emoji }] });
          changed('topic', name);
        }
      } catch (e) {
        errorToast(e, 'The reaction was not added');
      }
    },
    unreact: async (m, id) => {
      try {
        await api.call('DELETE', `${path}/reactions/${enc(id)}`);
      } catch (e) {
        if (!(e instanceof api.ApiError && e.status === 404)) {
          errorToast(e, 'The reaction was not taken back');
          return;
        }
      }
      const tp = t();
      const cur = tp && tp.msgs.get(msgKey(m));
      if (cur) {
        tp.put({ ...cur, reactions: cur.reactions.filter((x) => x.id !== id) });
        changed('topic', name);
      }
    },
    edit: async (m, text) => {
      const p = await api.call('PUT', `${path}/${enc(m.id)}`, text);
      applyPost({ action: 'edit', author: state.me, topic: name, post: p });
    },
    del: async (m) => {
      await api.call('DELETE', `${path}/${enc(m.id)}`);
      applyPost({ action: 'delete', author: state.me, topic: name, post: { id: m.id } });
    },
    hide: async (m) => {
      await api.call('POST', `${path}/moderation`, { msgID: m.id, type: 'hide', author: m.author });
      state.hidden.add(msgKey(m));
      const tp = t();
      if (tp) tp.remove(msgKey(m));
      changed('topic', name);
      changed('topics');
    },
    markRead: (date) => markRead('topic', name, date),
  });
  shell.main.append(view.el);
  view.render();
}

function showConv(key) {
  let c = state.convs.get(key);
  if (!c) {
    const m = /^key:([0-9a-f]{64})$/.exec(key);
    if (m && m[1] !== state.me) c = conv(key, m[1], null);
  }
  if (!c) {
    current.title = 'Conversation';
    shell.main.append(h('p', { class: 'loading' }, state.convsLoaded ? 'There is no such conversation.' : 'Loading…'));
    return;
  }
  const title = c.channel ? `≡ ${convTitle(c)}` : `@ ${convTitle(c)}`;
  current.title = title;
  const others = c.channel ? c.channel.members.filter((k) => k !== state.me) : [c.peer];
  const strangers = others.filter((k) => !state.friends.some((f) => f.key === k));
  const subtitle = c.channel
    ? `Private channel: ${c.channel.members.map((k) => nameOf(k)).join(', ')}`
    : h('code', { class: 'short', title: c.peer }, c.peer);
  const header =
    strangers.length && state.friends
      ? h(
          'p',
          { class: 'notice' },
          `${strangers.map((k) => nameOf(k)).join(', ')} ${strangers.length > 1 ? 'are' : 'is'} not among your friends: what they send from another gateway reaches you once you add them (sending adds them). `,
          h(
            'button',
            {
              type: 'button',
              onclick: async (e) => {
                try {
                  for (const k of strangers) await addFriend(k);
                  e.target.closest('.notice').remove();
                } catch (err) {
                  errorToast(err, 'Not added');
                }
              },
            },
            'Add as friend',
          ),
        )
      : null;
  const befriend = async () => {
    for (const k of others) {
      if (!state.friends.some((f) => f.key === k)) await addFriend(k);
    }
  };
  const sendMessage = async (message) => {
    await befriend();
    if (c.channel) {
      const res = await api.call('POST', 'dms', {
        members: c.channel.members,
        message,
        name: c.channel.name,
        channel: c.channel.id,
      });
      if (res.length) addDM(res[0]);
    } else {
      addDM(await api.call('POST', 'dm', { key: c.peer, message }));
    }
  };
  view = new ChatView({
    kind: 'conv',
    id: key,
    title,
    subtitle,
    header,
    placeholder: `Message ${convTitle(c)}`,
    source: () => c.sorted(),
    hasOlder: () => false,
    loadOlder: async () => {},
    send: (text) => sendMessage(text),
    sendFile: (file) => sendMessage({ type: 'file', value: file }),
    upload: (f, progress) => api.upload(f, progress, true), // sealed: only the conversation can open it
    markRead: (date) => markRead('conv', key, date),
  });
  shell.main.append(view.el);
  view.render();
}

boot();
