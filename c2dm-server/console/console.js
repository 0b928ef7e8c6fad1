// The operator's console: a client of the server's own API, nothing more. The admin token
// lives in this tab's sessionStorage only. Every text from the server goes into the page as
// text (textContent), never as markup.
'use strict';

(() => {
  const TOKEN_KEY = 'c2dm-admin-token';
  const PAGE = 50;
  const POLL_MS = 1000;
  const IDLE_POLL_MS = 3000;
  /** How often the accounts' pauses are read, for the banner. */
  const ACCOUNTS_POLL_MS = 5000;
  const VIEWS = ['login-view', 'messages-view', 'message-view', 'devices-view', 'device-view', 'send-view'];

  const $ = (id) => document.getElementById(id);
  let token = sessionStorage.getItem(TOKEN_KEY);
  let poll = null;
  let accountsPoll = null;
  // Bumped on each navigation: an answer for an earlier view is dropped.
  let generation = 0;

  /** An answer of the API that is not a success. */
  class ApiError extends Error {
    constructor(status, body) {
      const error = body && body.error ? body.error : {};
      super(error.message || `the server answered ${status}`);
      this.status = status;
      this.code = error.code || null;
      this.field = error.field || null;
    }
  }

  async function api(method, path, body, headers) {
    const init = { method, headers: Object.assign({ Authorization: `Bearer ${token}` }, headers || {}) };
    if (body !== undefined) {
      init.headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(path, init);
    } catch (e) {
      throw new ApiError(0, { error: { message: 'the server did not answer; is it running?' } });
    }
    let json = null;
    try {
      json = await response.json();
    } catch (e) {
      json = null;
    }
    if (!response.ok) {
      const error = new ApiError(response.status, json);
      if (response.status === 401 && token !== null && $('login-view').hidden) {
        logOut('The server no longer accepts this token: log in again.');
      }
      throw error;
    }
    return json;
  }

  /** An element with attributes and children (strings become text). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === 'class') node.className = value;
      else if (name === 'text') node.textContent = value;
      else if (name.startsWith('on')) node.addEventListener(name.slice(2), value);
      else node.setAttribute(name, value === true ? '' : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === 'string' || typeof child === 'number' ? String(child) : child);
    }
    return node;
  }

  /** Labels `row`'s cells with their columns' short names (`data-short` of the header of
   *  table `tableId`), which the stacked cards of a narrow screen show; a cell that says
   *  nothing (`—`, or marked `data-empty`) is left out of the card. */
  function labelled(tableId, row) {
    const heads = $(tableId).tHead.rows[0].cells;
    [...row.cells].forEach((cell, i) => {
      const head = heads[i];
      if (head) cell.dataset.label = head.dataset.short ?? head.textContent;
      if (cell.textContent === '—') cell.dataset.empty = '';
    });
    return row;
  }

  const fmt = (n) => (n === null || n === undefined ? '—' : Number(n).toLocaleString('en'));
  const when = (text) => (text ? text.replace('T', ' ').replace(/\.\d+Z$/, ' UTC') : '—');
  const outcomeName = (o) => (o === 'not_attempted' ? 'not attempted' : o);

  function audienceText(to) {
    if (to === 'all') return 'every active device';
    if (to.user_id !== undefined) return `the devices of user ${to.user_id}`;
    if (to.tag !== undefined) return `the devices tagged ${to.tag}`;
    if (to.remaining_of !== undefined) return `the devices push ${to.remaining_of} did not reach`;
    const ids = to.registration_ids || [];
    return ids.length === 1 ? `1 registration id` : `${fmt(ids.length)} registration ids`;
  }

  const finished = (m) => m.state === 'done' || m.state === 'cancelled';
  const running = (m) => !finished(m);

  function stateText(m) {
    if (m.cancel_requested && running(m)) return `${m.state}, cancel asked for`;
    return m.state;
  }

  /** A progress bar of a push's tally, with its figures in words beside it. */
  function progress(m) {
    const t = m.tally;
    const parts = [
      ['accepted', t.accepted],
      ['rejected', t.rejected],
      ['failed', t.failed],
      ['not_attempted', t.not_attempted],
      ['pending', t.pending],
    ];
    const known = parts.reduce((sum, [, n]) => sum + (n || 0), 0);
    const words = parts
      .filter(([name, n]) => n !== null && (n > 0 || name === 'accepted' || name === 'pending'))
      .map(([name, n]) => `${outcomeName(name)} ${fmt(n)}`)
      .join(' · ');
    const label = t.pending === null ? `${words} · audience not yet counted` : words;
    const bar = el('div', { class: 'meter', role: 'img', 'aria-label': label });
    for (const [name, n] of parts) {
      if (!n || known === 0) continue;
      const segment = el('span', { class: `seg ${name}`, title: `${outcomeName(name)}: ${fmt(n)}` });
      // Through the CSSOM: the Content-Security-Policy refuses style attributes.
      segment.style.width = `${(100 * n) / known}%`;
      bar.append(segment);
    }
    return el('div', { class: 'progress', 'data-state': m.state }, bar, el('p', { class: 'legend', text: label }));
  }

  /** Each view's page title (a push's and a device's name their own once read). */
  const TITLES = {
    'login-view': 'Log in',
    'messages-view': 'Pushes',
    'message-view': 'Push',
    'devices-view': 'Devices',
    'device-view': 'Device',
    'send-view': 'Send a push',
  };

  function title(text) {
    document.title = `${text} · c2dm console`;
  }

  function show(view) {
    title(TITLES[view] || 'c2dm console');
    for (const id of VIEWS) $(id).hidden = id !== view;
    $('nav').hidden = view === 'login-view';
    for (const link of document.querySelectorAll('#nav a')) {
      const section = link.getAttribute('href').split('/')[1];
      if (view.startsWith(section.replace(/s$/, ''))) link.setAttribute('aria-current', 'page');
      else link.removeAttribute('aria-current');
    }
  }

  function notice(text) {
    $('notice').textContent = text || '';
    $('notice').hidden = !text;
  }

  function stopPolling() {
    if (poll !== null) clearTimeout(poll);
    poll = null;
  }

  function repeat(mine, every, work) {
    stopPolling();
    poll = setTimeout(async () => {
      if (mine !== generation) return;
      try {
        await work();
      } catch (e) {
        notice(`Could not refresh: ${e.message}`);
      }
    }, every);
  }

  // ---- Pushes ----

  let messagesShown = PAGE;
  let pushesFilter = { state: '', key: '' };

  function messageCard(m) {
    const cancel = running(m) && !m.cancel_requested
      ? el('button', { type: 'button', class: 'danger small', 'data-cancel': m.id, onclick: () => cancelPush(m.id) }, 'Cancel')
      : null;
    return el('li', { class: 'card', 'data-message': m.id, 'data-state': m.state },
      el('h3', {}, el('a', { href: `#/pushes/${m.id}` }, `Push ${m.id}`), ` · ${m.collapse_key}`),
      el('p', { class: 'meta' },
        el('span', { class: 'state', text: stateText(m) }),
        ` · to ${audienceText(m.to)}`,
        m.total !== null ? ` (${fmt(m.total)} ${m.total === 1 ? 'device' : 'devices'})` : '',
        ` · ${when(m.created_at)}`),
      progress(m),
      cancel);
  }

  async function showMessages(mine) {
    show('messages-view');
    const query = new URLSearchParams({ limit: String(Math.min(messagesShown, 1000)) });
    if (pushesFilter.state) query.set('state', pushesFilter.state);
    if (pushesFilter.key) query.set('collapse_key', pushesFilter.key);
    const page = await api('GET', `/v1/pushes?${query}`);
    if (mine !== generation) return;
    const list = $('message-list');
    list.replaceChildren(...page.pushes.map(messageCard));
    // What the list shows, for whoever waits for a filter's answer (the browser test).
    list.dataset.shown = JSON.stringify([pushesFilter.state, pushesFilter.key]);
    if (page.pushes.length === 0) {
      const filtered = pushesFilter.state || pushesFilter.key;
      list.append(el('li', { class: 'hint', text: filtered ? 'No push matches.' : 'No push yet: send one.' }));
    }
    const more = $('messages-more');
    more.hidden = page.next === null;
    more.onclick = () => {
      messagesShown += PAGE;
      showMessages(mine).catch((e) => notice(e.message));
    };
    // Quickly while a push is under way; now and then otherwise, for pushes made elsewhere.
    repeat(mine, page.pushes.some(running) ? POLL_MS : IDLE_POLL_MS, () => showMessages(mine));
  }

  async function cancelPush(id) {
    // Asked first: a cancel cannot be taken back.
    if (!window.confirm(`Cancel push ${id}? Its batches not started will not be sent.`)) return;
    try {
      await api('POST', `/v1/pushes/${encodeURIComponent(id)}/cancel`);
      notice(`Cancel asked for push ${id}: batches not started will not be sent.`);
    } catch (e) {
      notice(`Could not cancel push ${id}: ${e.message}`);
    }
    route();
  }

  async function finishPush(id, left) {
    if (!window.confirm(`Send push ${id} to the ${fmt(left)} devices it did not reach?`)) return;
    try {
      const made = await api('POST', `/v1/pushes/${encodeURIComponent(id)}/finish`);
      location.hash = `#/pushes/${made.id}`;
    } catch (e) {
      notice(`Could not finish push ${id}: ${e.message}`);
    }
  }

  // ---- One push ----

  let rowsFilter = { outcome: '', error: '' };

  function countRows(m) {
    const c = m.counts;
    const rows = [['accepted', '', c.accepted]];
    for (const [code, n] of Object.entries(c.rejected)) rows.push(['rejected', code, n]);
    rows.push(['failed', '', c.failed]);
    for (const [why, n] of Object.entries(c.not_attempted)) rows.push(['not_attempted', why, n]);
    rows.push(['pending', '', c.pending]);
    return rows;
  }

  /** How long seconds read: `42 s`, `3 min 5 s`, `1 h 2 min`. */
  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  /** A running push's pace: elapsed time, rate so far, and the time left at that rate. */
  function pace(m) {
    if (!running(m)) return [];
    const elapsed = (Date.now() - Date.parse(m.created_at)) / 1000;
    const t = m.tally;
    const done = t.accepted + t.rejected + t.failed + t.not_attempted;
    const rate = elapsed > 0 ? done / elapsed : 0;
    let left = 'not yet known';
    if (t.pending === 0) left = '0 s';
    else if (t.pending !== null && rate > 0) left = `about ${duration(t.pending / rate)}`;
    return [
      ['Elapsed', duration(elapsed)],
      ['Rate', `${fmt(Math.round(rate))} devices a second`],
      ['Time left', left],
    ];
  }

  function renderMessage(m) {
    $('message-title').textContent = `Push ${m.id}`;
    title(`Push ${m.id}`);
    const facts = [
      ['State', stateText(m)],
      ['To', audienceText(m.to)],
      ['Devices', m.total === null ? 'not yet counted' : fmt(m.total)],
      ['Collapse key', m.collapse_key],
      ['Made', when(m.created_at)],
      ['Finished', when(m.finished_at)],
      ...pace(m),
    ];
    $('message-facts').replaceChildren(...facts.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v, 'data-fact': k.toLowerCase() })]));
    $('message-progress').replaceChildren(progress(m));
    const cancel = $('message-cancel');
    cancel.hidden = !(running(m) && !m.cancel_requested);
    cancel.onclick = () => cancelPush(m.id);
    // A cancelled push with devices it did not reach can be finished: sent to them alone.
    const left = m.state === 'cancelled' ? (m.counts.not_attempted.cancelled || 0) : 0;
    const finish = $('message-finish');
    finish.hidden = left === 0;
    finish.textContent = `Finish: send to the ${fmt(left)} devices it did not reach`;
    finish.onclick = () => finishPush(m.id, left);
    $('message-counts').tBodies[0].replaceChildren(...countRows(m).map(([outcome, code, n]) =>
      el('tr', { 'data-outcome': outcome, 'data-code': code },
        el('td', { text: outcomeName(outcome) }), el('td', { text: code || '—' }), el('td', { class: 'num', text: fmt(n) }))));
    // The codes seen so far, to filter by.
    const select = $('filter-error');
    const codes = [...Object.keys(m.counts.rejected), ...Object.keys(m.counts.not_attempted)];
    const have = [...select.options].map((o) => o.value);
    for (const code of codes) if (!have.includes(code)) select.append(el('option', { value: code, text: code }));
    select.value = rowsFilter.error;
  }

  function deliveryRow(d) {
    return labelled('deliveries', el('tr', { 'data-outcome': d.outcome },
      el('td', {}, el('a', { href: `#/devices/${encodeURIComponent(d.registration_id)}`, text: d.registration_id })),
      el('td', { text: outcomeName(d.outcome) }),
      el('td', { text: d.error || '—' }),
      el('td', { text: d.message_id || '—' }),
      el('td', { class: 'num', text: fmt(d.attempts) }),
      el('td', { class: 'num', text: fmt(d.possible_duplicates), 'data-empty': d.possible_duplicates === 0 }),
      el('td', { text: when(d.at) })));
  }

  async function loadDeliveries(mine, id, after) {
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (rowsFilter.outcome) query.set('outcome', rowsFilter.outcome);
    if (rowsFilter.error) query.set('error', rowsFilter.error);
    if (after) query.set('after', after);
    const page = await api('GET', `/v1/pushes/${encodeURIComponent(id)}/deliveries?${query}`);
    if (mine !== generation) return;
    const body = $('deliveries').tBodies[0];
    const rows = page.deliveries.map(deliveryRow);
    if (after) body.append(...rows);
    else body.replaceChildren(...rows);
    $('deliveries-empty').hidden = body.rows.length > 0;
    const more = $('deliveries-more');
    more.hidden = page.next === null;
    more.onclick = () => loadDeliveries(mine, id, page.next).catch((e) => notice(e.message));
  }

  async function showMessage(mine, id) {
    show('message-view');
    $('message-facts').replaceChildren();
    $('deliveries').tBodies[0].replaceChildren();
    $('filter-error').replaceChildren(el('option', { value: '', text: 'any' }));
    rowsFilter = { outcome: '', error: '' };
    $('filter-outcome').value = '';
    $('deliveries-filter').onsubmit = (event) => {
      event.preventDefault();
      rowsFilter = { outcome: $('filter-outcome').value, error: $('filter-error').value };
      loadDeliveries(mine, id).catch((e) => notice(e.message));
    };
    const m = await api('GET', `/v1/pushes/${encodeURIComponent(id)}`);
    if (mine !== generation) return;
    renderMessage(m);
    await loadDeliveries(mine, id);
    if (running(m)) watchMessage(mine, id);
  }

  function watchMessage(mine, id) {
    repeat(mine, POLL_MS, async () => {
      const m = await api('GET', `/v1/pushes/${encodeURIComponent(id)}`);
      if (mine !== generation) return;
      renderMessage(m);
      if (running(m)) watchMessage(mine, id);
      else await loadDeliveries(mine, id);
    });
  }

  // ---- Devices ----

  async function showDevices(mine) {
    show('devices-view');
    const counts = await api('GET', '/v1/device-counts');
    if (mine !== generation) return;
    $('device-counts').replaceChildren(...[['Active', counts.active], ['Unregistered', counts.unregistered], ['Gone', counts.gone]]
      .flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: fmt(v), 'data-count': k.toLowerCase() })]));
    // The first page of what the form says (every device, at first), to browse.
    await searchDevices(mine);
  }

  function providerText(provider) {
    return provider === 'fcm' ? 'FCM' : 'C2DM';
  }

  function deviceRow(d) {
    return labelled('device-results', el('tr', { 'data-state': d.state },
      el('td', {}, el('a', { href: `#/devices/${encodeURIComponent(d.registration_id)}`, text: d.registration_id })),
      el('td', { text: providerText(d.provider) }),
      el('td', { text: d.user_id || '—' }),
      el('td', { text: d.tags.join(', ') || '—' }),
      el('td', { text: d.reason ? `${d.state} (${d.reason})` : d.state }),
      el('td', { text: when(d.state_changed_at) })));
  }

  /** A page of the devices the search form names (every device when its text is empty), in
   *  the order they registered; `after` continues an earlier page. */
  async function searchDevices(mine, after) {
    const by = $('search-by').value;
    const text = $('search-text').value.trim();
    const state = $('search-state').value;
    const table = $('device-results');
    const body = table.tBodies[0];
    $('search-error').hidden = true;
    const more = $('devices-more');
    more.hidden = true;
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (text) query.set(by, text);
    if (state) query.set('state', state);
    if (after) query.set('after', after);
    try {
      const page = await api('GET', `/v1/devices?${query}`);
      if (mine !== generation) return;
      const rows = page.devices.map(deviceRow);
      if (after) body.append(...rows);
      else body.replaceChildren(...rows);
      table.hidden = body.rows.length === 0;
      // What the table shows, for whoever waits for a search's answer (the browser test).
      table.dataset.shown = JSON.stringify([by, text, state]);
      $('devices-empty').hidden = body.rows.length > 0;
      more.hidden = page.next === null;
      more.onclick = () => searchDevices(mine, page.next);
    } catch (e) {
      table.hidden = true;
      $('devices-empty').hidden = true;
      $('search-error').textContent = e.field ? `${e.field}: ${e.message}` : e.message;
      $('search-error').hidden = false;
    }
  }

  async function showDevice(mine, id) {
    show('device-view');
    $('device-title').textContent = 'Device';
    $('device-facts').replaceChildren();
    $('device-history').tBodies[0].replaceChildren();
    const d = await api('GET', `/v1/devices/${encodeURIComponent(id)}`);
    if (mine !== generation) return;
    $('device-title').textContent = `Device ${d.registration_id}`;
    title(`Device ${d.registration_id}`);
    const facts = [
      ['State', d.reason ? `${d.state} (${d.reason})` : d.state],
      ['Provider', providerText(d.provider)],
      ['User', d.user_id || '—'],
      ['Tags', d.tags.join(', ') || '—'],
      ['Device id', d.device_id || '—'],
      ['App version', d.app_version || '—'],
      ['Registered', when(d.created_at)],
      ['Updated', when(d.updated_at)],
      ['State changed', when(d.state_changed_at)],
    ];
    $('device-facts').replaceChildren(...facts.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v })]));
    await loadHistory(mine, id);
  }

  async function loadHistory(mine, id, after) {
    const query = new URLSearchParams({ limit: String(PAGE) });
    if (after) query.set('after', after);
    const page = await api('GET', `/v1/devices/${encodeURIComponent(id)}/deliveries?${query}`);
    if (mine !== generation) return;
    const body = $('device-history').tBodies[0];
    const rows = page.deliveries.map((d) => labelled('device-history', el('tr', { 'data-outcome': d.outcome },
      el('td', {}, el('a', { href: `#/pushes/${d.push_id}`, text: `Push ${d.push_id}` })),
      el('td', { text: outcomeName(d.outcome) }),
      el('td', { text: d.error || '—' }),
      el('td', { class: 'num', text: fmt(d.attempts) }),
      el('td', { text: when(d.at) }))));
    if (after) body.append(...rows);
    else body.replaceChildren(...rows);
    $('history-empty').hidden = body.rows.length > 0;
    const more = $('history-more');
    more.hidden = page.next === null;
    more.onclick = () => loadHistory(mine, id, page.next).catch((e) => notice(e.message));
  }

  // ---- Sending ----

  let pending = null;

  function randomKey() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return [...bytes].map((b) => b.toString(16).padStart(2, '0')).join('');
  }

  function sendError(text) {
    $('send-error').textContent = text;
    $('send-error').hidden = !text;
  }

  function audienceChanged() {
    const kind = document.querySelector('input[name=audience]:checked').value;
    const target = $('send-target');
    target.disabled = kind === 'all';
    $('send-target-label').textContent = {
      all: 'Nothing more to say: every active device',
      user_id: 'User',
      tag: 'Tag',
      registration_ids: 'Registration ids, one per line',
    }[kind];
  }

  /** A push to everyone, or to more than this many devices, is confirmed by typing its size. */
  const TYPED_CONFIRMATION_OVER = 1000;

  /** The push the form describes, how many devices it goes to, and whether that must be typed. */
  async function review() {
    const kind = document.querySelector('input[name=audience]:checked').value;
    const target = $('send-target').value.trim();
    let to;
    let size;
    let count;
    if (kind === 'all') {
      to = 'all';
      count = (await api('GET', '/v1/device-counts')).active;
      size = `${fmt(count)} active devices`;
    } else if (!target) {
      throw new Error('Say whom the push goes to.');
    } else if (kind === 'registration_ids') {
      const ids = [...new Set(target.split(/\s+/).filter(Boolean))];
      to = { registration_ids: ids };
      count = ids.length;
      size = `${fmt(count)} registration ids (those not active get a “not attempted” row instead of a send)`;
    } else {
      to = { [kind]: target };
      count = (await api('GET', `/v1/device-counts?${new URLSearchParams({ [kind]: target })}`)).active;
      size = `${fmt(count)} active devices of ${kind === 'tag' ? 'tag' : 'user'} ${target}`;
    }
    if (count === 0) throw new Error('No active device is in this audience: the push would reach no one.');
    const data = {};
    for (const line of $('send-data').value.split('\n').map((l) => l.trim()).filter(Boolean)) {
      const at = line.indexOf('=');
      if (at <= 0) throw new Error(`Data lines are key=value: “${line}” is not.`);
      data[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    const body = {
      to,
      collapse_key: $('send-collapse-key').value,
      data,
      delay_while_idle: $('send-delay').checked,
    };
    const typed = kind === 'all' || count > TYPED_CONFIRMATION_OVER ? count : null;
    return { body, size, typed, key: randomKey() };
  }

  /** The review of `push`: everything it sends, to whom, and the typed confirmation if due. */
  function showReview(push) {
    const data = Object.entries(push.body.data);
    const facts = [
      ['To', push.size],
      ['Collapse key', push.body.collapse_key],
      ['Data', data.length ? data.map(([k, v]) => `${k}=${v}`).join('\n') : '—'],
      ['delay_while_idle', push.body.delay_while_idle ? 'yes: delivered when the device wakes' : 'no'],
    ];
    $('confirm-facts').replaceChildren(...facts.flatMap(([k, v]) => [el('dt', { text: k }), el('dd', { text: v, 'data-fact': k.toLowerCase().replace(/ /g, '_') })]));
    const typing = push.typed !== null;
    $('confirm-typed').hidden = !typing;
    $('confirm-count').value = '';
    $('confirm-count-label').textContent = typing
      ? `This push goes to ${fmt(push.typed)} devices. Type that number to send it:`
      : '';
    $('confirm-send').disabled = typing;
    $('send-form').hidden = true;
    $('send-confirm').hidden = false;
    (typing ? $('confirm-count') : $('confirm-send')).focus();
  }

  /** Send stays disabled until the typed number is the audience's size. */
  function typedChanged() {
    if (!pending || pending.typed === null) return;
    const typed = $('confirm-count').value.replace(/[\s,.\u202f]/g, '');
    $('confirm-send').disabled = typed !== String(pending.typed);
  }

  function showSend() {
    show('send-view');
    $('send-form').hidden = false;
    $('send-confirm').hidden = true;
    sendError('');
    audienceChanged();
  }

  async function confirmSend() {
    if (!pending) return;
    $('confirm-send').disabled = true;
    try {
      const message = await api('POST', '/v1/pushes', pending.body, { 'Idempotency-Key': pending.key });
      pending = null;
      // The next push starts from an empty form, not from this one's audience and payload.
      $('send-form').reset();
      audienceChanged();
      location.hash = `#/pushes/${message.id}`;
    } catch (e) {
      $('send-confirm').hidden = true;
      $('send-form').hidden = false;
      sendError(e.field ? `${e.field}: ${e.message}` : e.message);
    } finally {
      $('confirm-send').disabled = false;
    }
  }


  // ---- The accounts' pauses ----

  function accountName(name) {
    return name.startsWith('fcm:') ? `FCM project ${name.slice(4)}` : `C2DM account ${name}`;
  }

  /** The banner: each paused account, until when and why; hidden when none is paused. */
  async function showPauses() {
    if (token === null) return;
    let accounts;
    try {
      accounts = (await api('GET', '/v1/accounts')).accounts;
    } catch (e) {
      return;
    }
    const paused = accounts.filter((a) => a.paused_until !== null);
    const lines = paused.map((a) => {
      const left = (Date.parse(a.paused_until) - Date.now()) / 1000;
      return `Sending is paused for ${accountName(a.account)} until ${when(a.paused_until)} `
        + `(${duration(left)} from now): ${a.pause_reason || 'no reason was given'}.`;
    });
    $('paused').textContent = lines.join('\n');
    $('paused').hidden = lines.length === 0;
  }

  function watchPauses() {
    if (accountsPoll !== null) clearInterval(accountsPoll);
    accountsPoll = setInterval(showPauses, ACCOUNTS_POLL_MS);
    showPauses();
  }

  // ---- Logging in and out, and the routes ----

  function logOut(why) {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    stopPolling();
    if (accountsPoll !== null) clearInterval(accountsPoll);
    accountsPoll = null;
    $('paused').hidden = true;
    generation += 1;
    show('login-view');
    $('token').value = '';
    $('login-error').textContent = why || '';
    $('login-error').hidden = !why;
  }

  async function logIn(event) {
    event.preventDefault();
    const given = $('token').value.trim();
    token = given;
    $('login-button').disabled = true;
    try {
      await api('GET', '/v1/device-counts');
      sessionStorage.setItem(TOKEN_KEY, given);
      $('login-error').hidden = true;
      if (!location.hash || location.hash === '#/') location.hash = '#/pushes';
      else route();
    } catch (e) {
      token = null;
      $('login-error').textContent = e.status === 401
        ? 'This token is not accepted. Check it and try again.'
        : e.status === 403
          ? 'This is the device key: the console needs the admin token.'
          : `Could not log in: ${e.message}`;
      $('login-error').hidden = false;
    } finally {
      $('login-button').disabled = false;
    }
  }

  function route() {
    stopPolling();
    generation += 1;
    const mine = generation;
    if (token === null) {
      show('login-view');
      return;
    }
    notice('');
    if (accountsPoll === null) watchPauses();
    else showPauses();
    const [, section, id] = location.hash.split('/');
    const failed = (e) => {
      if (mine === generation && e.status !== 401) notice(e.status === 404 ? `Not found: ${e.message}.` : e.message);
    };
    const decoded = id === undefined ? undefined : decodeURIComponent(id);
    if (section === 'pushes' && decoded) showMessage(mine, decoded).catch(failed);
    else if (section === 'devices' && decoded) showDevice(mine, decoded).catch(failed);
    else if (section === 'devices') showDevices(mine).catch(failed);
    else if (section === 'send') showSend();
    else showMessages(mine).catch(failed);
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', logIn);
    $('logout').addEventListener('click', () => logOut('Logged out.'));
    $('device-search').addEventListener('submit', (event) => {
      event.preventDefault();
      searchDevices(generation);
    });
    $('pushes-filter').addEventListener('submit', (event) => {
      event.preventDefault();
      pushesFilter = { state: $('pushes-state').value, key: $('pushes-key').value.trim() };
      messagesShown = PAGE;
      route();
    });
    for (const radio of document.querySelectorAll('input[name=audience]')) radio.addEventListener('change', audienceChanged);
    $('send-form').addEventListener('submit', async (event) => {
      event.preventDefault();
      sendError('');
      try {
        pending = await review();
      } catch (e) {
        sendError(e.message);
        return;
      }
      showReview(pending);
    });
    $('confirm-count').addEventListener('input', typedChanged);
    $('confirm-send').addEventListener('click', confirmSend);
    $('confirm-back').addEventListener('click', () => {
      $('send-confirm').hidden = true;
      $('send-form').hidden = false;
    });
    window.addEventListener('hashchange', route);
    route();
  });
})();
