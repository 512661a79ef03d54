// The people screen: your key (copy, QR code), your profile name, friends (add by key,
// message), private channels of several friends.

import { call, getSession } from './api.js';
import { HEX64, copyText, h, shortKey } from './dom.js';
import { qrSvg } from './qr.js';
import { changed, conv, convKeyOf, nameOf, state } from './store.js';
import { errorToast, toast } from './ui.js';

export function peopleView(go) {
  const root = h('section', { class: 'people', 'aria-labelledby': 'people-title' });

  // --- you ---
  const keyText = h('code', { class: 'key', id: 'my-key' }, state.me);
  const copy = h(
    'button',
    {
      type: 'button',
      id: 'copy-key',
      onclick: async () => {
        const ok = await copyText(state.me);
        toast(ok ? 'Your key was copied.' : 'Copying was refused: select the key and copy it.', ok ? 'info' : 'error');
      },
    },
    'Copy',
  );
  const nameInput = h('input', { id: 'profile-name', maxlength: 128, required: true, autocomplete: 'nickname' });
  nameInput.value = (state.profile && state.profile.name) || '';
  const nameForm = h(
    'form',
    {
      class: 'inline',
      onsubmit: async (e) => {
        e.preventDefault();
        const name = nameInput.value.trim();
        if (!name) return;
        try {
          state.profile = await call('POST', 'profile', { name });
          changed('profile');
          changed('profiles');
          toast('Your name was saved.');
        } catch (err) {
          errorToast(err, 'The name was not saved');
        }
      },
    },
    h('label', { for: 'profile-name' }, 'Your name'),
    nameInput,
    h('button', { type: 'submit' }, 'Save'),
  );
  let qr = null;
  try {
    qr = qrSvg(state.me, 'QR code of your key');
  } catch {
    qr = null;
  }
  root.append(
    h('header', { class: 'chat-head' }, h('h1', { id: 'people-title' }, 'People')),
    h(
      'div',
      { class: 'people-body' },
      h(
        'section',
        { class: 'card you', 'aria-labelledby': 'you-title' },
        h('h2', { id: 'you-title' }, 'You'),
        nameForm,
        h('p', { class: 'hint' }, 'Your key: give it to friends so that they can add you.'),
        h('div', { class: 'keyrow' }, keyText, copy),
        qr ? h('div', { class: 'qr-wrap' }, qr) : null,
      ),
      friendsSection(go),
      channelSection(go),
      getSession() && getSession().method === 'password' ? passwordSection() : null,
    ),
  );
  return root;
}

function passwordSection() {
  const field = (id, label, autocomplete) => {
    const input = h('input', { id, type: 'password', autocomplete, required: true, maxlength: 1024 });
    return [h('label', { for: id }, label), input];
  };
  const [curLabel, cur] = field('pw-current', 'Current password', 'current-password');
  const [newLabel, next] = field('pw-new', 'New password (8 characters or more)', 'new-password');
  const [againLabel, again] = field('pw-again', 'New password again', 'new-password');
  next.minLength = 8;
  const form = h(
    'form',
    {
      class: 'card password',
      'aria-labelledby': 'pw-change-title',
      onsubmit: async (e) => {
        e.preventDefault();
        if (next.value !== again.value) {
          toast('The two new passwords differ.', 'error');
          again.focus();
          return;
        }
        try {
          const res = await call('POST', 'password', { password: cur.value, new_password: next.value });
          form.reset();
          const others = res.sessions_ended;
          toast(`Your password was changed${others ? `; ${others} other login${others > 1 ? 's' : ''} ended` : ''}.`);
        } catch (err) {
          errorToast(err, 'The password was not changed');
        }
      },
    },
    h('h2', { id: 'pw-change-title' }, 'Password'),
    curLabel,
    cur,
    newLabel,
    next,
    againLabel,
    again,
    h('button', { type: 'submit' }, 'Change password'),
  );
  return form;
}

function friendsSection(go) {
  const key = h('input', {
    id: 'friend-key',
    required: true,
    autocomplete: 'off',
    spellcheck: 'false',
    pattern: '[0-9a-fA-F]{64}',
    title: '64 hex digits',
  });
  const name = h('input', { id: 'friend-name', maxlength: 128, autocomplete: 'off' });
  const list = h('ul', { class: 'friends', id: 'friend-list' });
  const draw = () => {
    while (list.firstChild) list.firstChild.remove();
    if (!state.friends.length) list.append(h('li', { class: 'hint' }, 'No friends yet.'));
    for (const f of state.friends) {
      list.append(
        h(
          'li',
          {},
          h('span', { class: 'who' }, h('span', { class: 'name' }, nameOf(f.key)), h('code', { class: 'short', title: f.key }, shortKey(f.key))),
          h('button', { type: 'button', class: 'message', onclick: () => go(`#/dm/${encodeURIComponent(convKeyOf(null, f.key))}`) }, 'Message'),
        ),
      );
    }
  };
  draw();
  const form = h(
    'form',
    {
      onsubmit: async (e) => {
        e.preventDefault();
        const k = key.value.trim().toLowerCase();
        if (!HEX64.test(k)) {
          toast('A key is 64 hex digits.', 'error');
          return;
        }
        if (k === state.me) {
          toast('That is your own key.', 'error');
          return;
        }
        try {
          await addFriend(k, name.value.trim());
          key.value = '';
          name.value = '';
          draw();
          toast(`${nameOf(k)} is now a friend.`);
        } catch (err) {
          errorToast(err, 'The friend was not added');
        }
      },
    },
    h('label', { for: 'friend-key' }, 'Their key'),
    key,
    h('label', { for: 'friend-name' }, 'Name (optional)'),
    name,
    h('div', { class: 'row' }, h('button', { type: 'submit', class: 'primary' }, 'Add friend')),
  );
  return h(
    'section',
    { class: 'card', 'aria-labelledby': 'friends-title' },
    h('h2', { id: 'friends-title' }, 'Friends'),
    h('p', { class: 'hint' }, 'Direct messages from someone on another gateway reach you once you have added them as a friend.'),
    form,
    list,
  );
}

export async function addFriend(key, name) {
  const body = name ? { key, name } : { key };
  const rec = await call('POST', 'friends', body);
  state.friends = state.friends.filter((f) => f.key !== rec.key).concat([rec]);
  changed('friends');
  changed('convs');
  return rec;
}

function channelSection(go) {
  const name = h('input', { id: 'channel-name', maxlength: 128, required: true, autocomplete: 'off' });
  const boxes = state.friends.map((f) =>
    h('label', { class: 'check' }, h('input', { type: 'checkbox', value: f.key }), ' ', nameOf(f.key)),
  );
  const form = h(
    'form',
    {
      onsubmit: async (e) => {
        e.preventDefault();
        const members = boxes.map((b) => b.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
        if (!members.length) {
          toast('Pick at least one friend.', 'error');
          return;
        }
        try {
          const ch = await call('POST', 'pchannels', { members, name: name.value.trim() || 'channel' });
          state.pchannels.push(ch);
          const c = conv(convKeyOf(ch, null), null, ch);
          changed('convs');
          go(`#/dm/${encodeURIComponent(c.key)}`);
        } catch (err) {
          errorToast(err, 'The channel was not made');
        }
      },
    },
    h('label', { for: 'channel-name' }, 'Channel name'),
    name,
    h('fieldset', {}, h('legend', {}, 'Members'), boxes.length ? boxes : h('p', { class: 'hint' }, 'Add friends first.')),
    h('div', { class: 'row' }, h('button', { type: 'submit', class: 'primary', disabled: !boxes.length }, 'Create channel')),
  );
  return h(
    'section',
    { class: 'card', 'aria-labelledby': 'channel-title' },
    h('h2', { id: 'channel-title' }, 'New private channel'),
    h('p', { class: 'hint' }, 'Each message is encrypted for every member.'),
    form,
  );
}
