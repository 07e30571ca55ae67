// The chat page: conversations kept in localStorage, answers streamed from
// /v1/chat/completions (see api.js), model output rendered by markdown.js as
// DOM nodes (never as HTML).
//
// localStorage keys:
//   llama-serve.chat.v1      {version: 1, currentId, conversations: [{id, title,
//                             createdAt, updatedAt, messages: [{id, role, content,
//                             state?, error?, stats?, model?}]}]}
//   llama-serve.settings.v1  {model, systemPrompt, temperature, topP, maxTokens, seed}
//                             (the fields as typed; blank means "the server's default")
//   llama-serve.api-key      the bearer key, when one is set

import { renderMarkdown } from './markdown.js';
import { describeError, listModels, streamChat } from './api.js';

const STORE_KEY = 'llama-serve.chat.v1';
const SETTINGS_KEY = 'llama-serve.settings.v1';
const API_KEY_KEY = 'llama-serve.api-key';
const SAVE_INTERVAL_MS = 1000;

const $ = (id) => document.getElementById(id);
const ui = {
  app: $('app'),
  sidebar: $('sidebar'),
  sidebarClose: $('sidebar-close'),
  backdrop: $('backdrop'),
  menuButton: $('menu-button'),
  newChat: $('new-chat'),
  conversationList: $('conversation-list'),
  title: $('conversation-title'),
  modelPill: $('model-pill'),
  settingsButton: $('settings-button'),
  banner: $('banner'),
  bannerText: $('banner-text'),
  bannerAction: $('banner-action'),
  messages: $('messages'),
  empty: $('empty-state'),
  input: $('composer-input'),
  send: $('send-button'),
  sendLabel: $('send-label'),
  settings: $('settings'),
  settingsClose: $('settings-close'),
  settingsDone: $('settings-done'),
  settingsError: $('settings-error'),
  modelSelect: $('model-select'),
  systemPrompt: $('system-prompt'),
  temperature: $('temperature'),
  topP: $('top-p'),
  maxTokens: $('max-tokens'),
  seed: $('seed'),
  apiKey: $('api-key'),
  apiKeyToggle: $('api-key-toggle'),
  announcer: $('announcer'),
};

// ---------------------------------------------------------------- storage

function readJson(key) {
  try {
    const text = localStorage.getItem(key);
    return text ? JSON.parse(text) : null;
  } catch {
    return null;
  }
}

let storageWarningShown = false;

function writeStorage(key, value) {
  try {
    if (value === null) localStorage.removeItem(key);
    else localStorage.setItem(key, typeof value === 'string' ? value : JSON.stringify(value));
  } catch (err) {
    if (!storageWarningShown) {
      storageWarningShown = true;
      showBanner(`This browser would not save the conversation (${err?.name || err}); it will be lost on reload.`);
    }
  }
}

const isString = (value) => typeof value === 'string';

function sanitizeMessage(raw) {
  if (!raw || !['user', 'assistant'].includes(raw.role) || !isString(raw.content)) return null;
  const message = { id: isString(raw.id) ? raw.id : newId(), role: raw.role, content: raw.content };
  // An answer that was streaming when the page went away is as good as stopped.
  if (isString(raw.state)) message.state = raw.state === 'streaming' ? 'stopped' : raw.state;
  if (isString(raw.error)) message.error = raw.error;
  if (isString(raw.model)) message.model = raw.model;
  if (raw.stats && typeof raw.stats === 'object') message.stats = raw.stats;
  return message;
}

function loadStore() {
  const raw = readJson(STORE_KEY);
  const conversations = Array.isArray(raw?.conversations) ? raw.conversations : [];
  const clean = conversations
    .filter((c) => c && isString(c.id) && Array.isArray(c.messages))
    .map((c) => ({
      id: c.id,
      title: isString(c.title) && c.title ? c.title : 'Untitled',
      createdAt: Number(c.createdAt) || Date.now(),
      updatedAt: Number(c.updatedAt) || Date.now(),
      messages: c.messages.map(sanitizeMessage).filter(Boolean),
    }));
  const currentId = clean.some((c) => c.id === raw?.currentId) ? raw.currentId : null;
  return { version: 1, currentId, conversations: clean };
}

function saveStore() {
  writeStorage(STORE_KEY, store);
}

const SETTING_FIELDS = ['model', 'systemPrompt', 'temperature', 'topP', 'maxTokens', 'seed'];

function loadSettings() {
  const raw = readJson(SETTINGS_KEY) ?? {};
  const settings = {};
  for (const field of SETTING_FIELDS) settings[field] = isString(raw[field]) ? raw[field] : '';
  let apiKey = '';
  try {
    apiKey = localStorage.getItem(API_KEY_KEY) ?? '';
  } catch {
    // Storage disabled: the key lives for this page only.
  }
  return { ...settings, apiKey };
}

function saveSettings() {
  const { apiKey, ...rest } = settings;
  writeStorage(SETTINGS_KEY, rest);
  writeStorage(API_KEY_KEY, apiKey ? apiKey : null);
}

// ---------------------------------------------------------------- state

let store = loadStore();
const settings = loadSettings();
let models = [];
/** The answer being generated: {conversationId, messageId, controller}. */
let generation = null;

function newId() {
  if (window.crypto?.randomUUID) return crypto.randomUUID();
  return `${Date.now().toString(36)}-${Math.random().toString(36).slice(2, 10)}`;
}

function currentConversation() {
  return store.conversations.find((c) => c.id === store.currentId) ?? null;
}

function findConversation(id) {
  return store.conversations.find((c) => c.id === id) ?? null;
}

function titleFrom(text) {
  const line = text.trim().split('\n')[0].trim();
  return line.length > 48 ? `${line.slice(0, 47)}…` : line || 'Untitled';
}

// ---------------------------------------------------------------- small UI helpers

function h(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'className') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

const ICONS = {
  copy: ['M9 9h10v10H9z', 'M5 15V5h10'],
  check: ['M5 12.5l4.5 4.5L19 7.5'],
  edit: ['M4 20h4L19 9l-4-4L4 16v4z', 'M13.5 6.5l4 4'],
  regenerate: ['M20 11a8 8 0 1 0-2.3 5.7', 'M20 5v6h-6'],
  trash: ['M5 7h14', 'M10 11v6M14 11v6', 'M6 7l1 12h10l1-12', 'M9 7V4h6v3'],
  chat: ['M5 5h14v10H9l-4 4V5z'],
};

function icon(name) {
  const svg = document.createElementNS('http://www.w3.org/2000/svg', 'svg');
  svg.setAttribute('viewBox', '0 0 24 24');
  svg.setAttribute('aria-hidden', 'true');
  for (const d of ICONS[name]) {
    const path = document.createElementNS('http://www.w3.org/2000/svg', 'path');
    path.setAttribute('d', d);
    svg.append(path);
  }
  return svg;
}

function actionButton(name, label, onclick, extra = {}) {
  return h('button', { type: 'button', className: 'action', onclick, ...extra }, icon(name), h('span', { text: label }));
}

function announce(text) {
  ui.announcer.textContent = '';
  // A fresh text node makes screen readers announce repeats too.
  setTimeout(() => {
    ui.announcer.textContent = text;
  }, 50);
}

let bannerAction = null;

function showBanner(text, actionLabel = null, action = null) {
  ui.bannerText.textContent = text;
  ui.bannerAction.hidden = !actionLabel;
  ui.bannerAction.textContent = actionLabel ?? '';
  bannerAction = action;
  ui.banner.hidden = false;
}

function hideBanner() {
  ui.banner.hidden = true;
  bannerAction = null;
}

async function copyText(text) {
  try {
    if (navigator.clipboard?.writeText) {
      await navigator.clipboard.writeText(text);
      return true;
    }
  } catch {
    // Not allowed here (an insecure origin, say): fall back below.
  }
  const area = h('textarea', { className: 'copy-buffer', readonly: true, 'aria-hidden': 'true' });
  area.value = text;
  document.body.append(area);
  area.select();
  let ok = false;
  try {
    ok = document.execCommand('copy');
  } catch {
    ok = false;
  }
  area.remove();
  return ok;
}

function flashCopied(button, ok) {
  const label = button.querySelector('span');
  const before = label.textContent;
  label.textContent = ok ? 'Copied' : 'Copy failed';
  button.classList.add('done');
  announce(ok ? 'Copied to the clipboard' : 'Could not copy');
  setTimeout(() => {
    label.textContent = before;
    button.classList.remove('done');
  }, 1500);
}

// ---------------------------------------------------------------- rendering

function formatMs(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

function statsLine(message) {
  const stats = message.stats;
  const parts = [];
  const stat = (name, text, title) => parts.push(h('span', { className: 'stat', dataset: { stat: name }, text, title }));
  if (message.state === 'stopped') stat('state', 'Stopped');
  if (stats?.finishReason === 'length') stat('state', 'Cut off at max tokens');
  if (stats?.ttftMs != null) stat('ttft', `${formatMs(stats.ttftMs)} to first token`, 'Time from sending the request to the first token of the answer');
  if (stats?.tokensPerSecond != null) {
    const approx = stats.approximate ? '≈' : '';
    stat('speed', `${approx}${stats.tokensPerSecond.toFixed(1)} tokens/s`, 'Generation speed after the first token');
  }
  if (stats?.completionTokens != null) stat('tokens', `${stats.completionTokens} tokens`, 'Tokens in this answer');
  if (stats?.cachedTokens != null && stats?.promptTokens != null) {
    stat('cached', `${stats.cachedTokens} of ${stats.promptTokens} prompt tokens cached`, 'Prompt tokens the server reused from its prefix cache instead of computing them');
  }
  return parts.length ? h('div', { className: 'msg-meta' }, ...parts) : null;
}

/** Model output → DOM (markdown.js builds nodes; nothing is parsed as HTML). */
function renderAnswer(content) {
  const fragment = renderMarkdown(content);
  for (const pre of fragment.querySelectorAll('pre.md-code')) {
    const code = pre.textContent;
    const copy = actionButton('copy', 'Copy code', (event) => {
      const button = event.currentTarget;
      copyText(code).then((ok) => flashCopied(button, ok));
    });
    const head = h('div', { className: 'code-head' }, h('span', { text: pre.dataset.language || 'code' }), copy);
    const block = h('div', { className: 'code-block' });
    pre.replaceWith(block);
    block.append(head, pre);
  }
  return fragment;
}

function messageBody(message) {
  if (message.role === 'user') return h('div', { className: 'msg-body user-text', text: message.content });
  const body = h('div', { className: 'msg-body md' });
  if (message.content) body.append(renderAnswer(message.content));
  else if (message.state === 'streaming') body.append(h('span', { className: 'typing', 'aria-label': 'Waiting for the first token' }, h('i'), h('i'), h('i')));
  return body;
}

function messageElement(conversation, message, index) {
  const isLast = index === conversation.messages.length - 1;
  const busy = generation !== null;
  const article = h('article', {
    className: `msg msg-${message.role}`,
    dataset: { id: message.id, role: message.role, state: message.state ?? 'done' },
    'aria-label': message.role === 'user' ? 'You' : 'Assistant',
  });
  const bubble = h('div', { className: 'msg-bubble' }, messageBody(message));
  if (message.error) bubble.append(h('p', { className: 'msg-error', role: 'alert', text: message.error }));
  article.append(bubble);
  if (message.role === 'assistant' && message.state !== 'streaming') {
    const meta = statsLine(message);
    if (meta) article.append(meta);
  }

  const actions = h('div', { className: 'msg-actions' });
  if (message.content && message.state !== 'streaming') {
    actions.append(actionButton('copy', 'Copy', (event) => {
      const button = event.currentTarget;
      copyText(message.content).then((ok) => flashCopied(button, ok));
    }, { 'aria-label': `Copy this ${message.role === 'user' ? 'message' : 'answer'}` }));
  }
  if (message.role === 'user') {
    actions.append(actionButton('edit', 'Edit', () => startEdit(conversation, message, article), {
      disabled: busy,
      'data-needs-idle': true,
      'aria-label': 'Edit this message and resend it',
    }));
  }
  if (message.role === 'assistant' && isLast && message.state !== 'streaming') {
    actions.append(actionButton('regenerate', message.error ? 'Retry' : 'Regenerate', () => regenerate(conversation), {
      disabled: busy,
      'data-needs-idle': true,
      'aria-label': message.error ? 'Retry this answer' : 'Regenerate this answer',
    }));
  }
  if (actions.childElementCount) article.append(actions);
  return article;
}

function isNearBottom() {
  const m = ui.messages;
  return m.scrollHeight - m.scrollTop - m.clientHeight < 80;
}

function scrollToBottom() {
  ui.messages.scrollTop = ui.messages.scrollHeight;
}

function renderConversation() {
  const conversation = currentConversation();
  for (const node of [...ui.messages.children]) if (node !== ui.empty) node.remove();
  const messages = conversation?.messages ?? [];
  ui.empty.hidden = messages.length > 0;
  messages.forEach((message, index) => ui.messages.append(messageElement(conversation, message, index)));
  ui.title.textContent = conversation?.title ?? 'New chat';
  document.title = conversation ? `${conversation.title} · llama-serve` : 'llama-serve chat';
  scrollToBottom();
}

function renderSidebar() {
  ui.conversationList.replaceChildren();
  const sorted = [...store.conversations].sort((a, b) => b.updatedAt - a.updatedAt);
  for (const conversation of sorted) {
    const current = conversation.id === store.currentId;
    const open = h('button', {
      type: 'button',
      className: 'conversation-open',
      'aria-current': current ? 'true' : undefined,
      onclick: () => switchTo(conversation.id),
    }, icon('chat'), h('span', { className: 'conversation-title', text: conversation.title }));
    const remove = h('button', {
      type: 'button',
      className: 'icon-button conversation-delete',
      'aria-label': `Delete conversation “${conversation.title}”`,
      title: 'Delete',
    }, icon('trash'));
    remove.addEventListener('click', () => confirmDelete(remove, conversation));
    ui.conversationList.append(h('li', { className: current ? 'current' : '', dataset: { id: conversation.id } }, open, remove));
  }
}

function render() {
  renderSidebar();
  renderConversation();
}

let renderQueued = new Set();
let frameRequested = false;

/** Repaints one message's body on the next frame (streaming: at most once a frame). */
function scheduleMessageRender(message) {
  renderQueued.add(message);
  if (frameRequested) return;
  frameRequested = true;
  requestAnimationFrame(() => {
    frameRequested = false;
    const queued = renderQueued;
    renderQueued = new Set();
    const stick = isNearBottom();
    for (const m of queued) repaintBody(m);
    if (stick) scrollToBottom();
  });
}

function repaintBody(message) {
  const article = ui.messages.querySelector(`article[data-id="${CSS.escape(message.id)}"]`);
  if (!article) return;
  article.querySelector('.msg-body').replaceWith(messageBody(message));
}

function setGenerating(on) {
  ui.app.classList.toggle('generating', on);
  ui.sendLabel.textContent = on ? 'Stop' : 'Send';
  ui.send.classList.toggle('button-stop', on);
  ui.send.title = on ? 'Stop the answer (Esc)' : 'Send (Enter)';
  for (const button of ui.messages.querySelectorAll('.msg-actions button[data-needs-idle]')) {
    button.disabled = on;
  }
}

// ---------------------------------------------------------------- settings

function fillSettingsForm() {
  ui.systemPrompt.value = settings.systemPrompt;
  ui.temperature.value = settings.temperature;
  ui.topP.value = settings.topP;
  ui.maxTokens.value = settings.maxTokens;
  ui.seed.value = settings.seed;
  ui.apiKey.value = settings.apiKey;
}

const NUMBER_FIELDS = [
  { key: 'temperature', input: () => ui.temperature, label: 'Temperature', min: 0, max: 2, integer: false, param: 'temperature' },
  { key: 'topP', input: () => ui.topP, label: 'Top p', min: 0, max: 1, integer: false, param: 'top_p' },
  { key: 'maxTokens', input: () => ui.maxTokens, label: 'Max tokens', min: 1, max: Infinity, integer: true, param: 'max_tokens' },
  { key: 'seed', input: () => ui.seed, label: 'Seed', min: -Infinity, max: Infinity, integer: true, param: 'seed' },
];

/** The sampling fields as request parameters, or the first problem with them. */
function samplingParameters() {
  const params = {};
  for (const field of NUMBER_FIELDS) {
    const input = field.input();
    const text = settings[field.key].trim();
    if (text === '' && !input.validity.badInput) continue;
    const value = Number(text);
    const range = field.max === Infinity
      ? (field.min === -Infinity ? 'a whole number' : `a whole number of at least ${field.min}`)
      : `a number from ${field.min} to ${field.max}`;
    if (text === '' || !Number.isFinite(value) || value < field.min || value > field.max || (field.integer && !Number.isInteger(value))) {
      return { error: `${field.label} must be ${range}.`, input };
    }
    params[field.param] = value;
  }
  return { params };
}

function openSettings(focus = null) {
  if (!ui.settings.open) {
    fillSettingsForm();
    ui.settings.showModal();
  }
  (focus ?? (ui.modelSelect.disabled ? ui.apiKey : ui.modelSelect)).focus();
}

function closeSettings() {
  if (ui.settings.open) ui.settings.close();
}

function bindSetting(input, key, event = 'input') {
  input.addEventListener(event, () => {
    settings[key] = input.value;
    saveSettings();
    ui.settingsError.hidden = true;
  });
}

// ---------------------------------------------------------------- models

let modelsRequest = 0;
/** The API key the model list was last asked for with. */
let modelsKey = null;

async function loadModels() {
  const ticket = ++modelsRequest;
  modelsKey = settings.apiKey;
  ui.modelPill.textContent = '…';
  try {
    const ids = await listModels({ apiKey: settings.apiKey });
    if (ticket !== modelsRequest) return;
    models = ids;
    hideBanner();
  } catch (err) {
    if (ticket !== modelsRequest) return;
    models = [];
    showBanner(`Could not list the models. ${describeError(err)}`, 'Open settings', () => openSettings(err?.status === 401 ? ui.apiKey : null));
  }
  ui.modelSelect.replaceChildren(...models.map((id) => h('option', { value: id, text: id })));
  if (!models.length) ui.modelSelect.append(h('option', { value: '', text: 'Could not load the model list' }));
  if (!models.includes(settings.model)) settings.model = models[0] ?? settings.model;
  ui.modelSelect.value = settings.model;
  ui.modelSelect.disabled = models.length === 0;
  ui.modelPill.textContent = models.length ? settings.model : 'no model';
  ui.modelPill.title = models.length ? `Model: ${settings.model}` : 'The model list could not be loaded';
}

// ---------------------------------------------------------------- conversations

function switchTo(id) {
  store.currentId = id;
  saveStore();
  render();
  closeSidebar();
  ui.input.focus();
}

function newChat() {
  store.currentId = null;
  saveStore();
  render();
  closeSidebar();
  ui.input.focus();
}

function confirmDelete(button, conversation) {
  if (button.dataset.confirm !== 'yes') {
    button.dataset.confirm = 'yes';
    button.classList.add('confirm');
    button.setAttribute('aria-label', `Confirm: delete “${conversation.title}”`);
    button.title = 'Click again to delete';
    announce('Press again to delete the conversation');
    setTimeout(() => {
      if (!button.isConnected) return;
      delete button.dataset.confirm;
      button.classList.remove('confirm');
      button.setAttribute('aria-label', `Delete conversation “${conversation.title}”`);
      button.title = 'Delete';
    }, 4000);
    return;
  }
  if (generation?.conversationId === conversation.id) generation.controller.abort();
  store.conversations = store.conversations.filter((c) => c.id !== conversation.id);
  if (store.currentId === conversation.id) {
    const next = [...store.conversations].sort((a, b) => b.updatedAt - a.updatedAt)[0];
    store.currentId = next?.id ?? null;
  }
  saveStore();
  render();
  announce('Conversation deleted');
  (ui.conversationList.querySelector('button') ?? ui.newChat).focus();
}

// ---------------------------------------------------------------- sending

function send() {
  if (generation) return;
  const text = ui.input.value;
  if (!text.trim()) {
    ui.input.focus();
    return;
  }
  const sampling = samplingParameters();
  if (sampling.error) {
    showSettingsError(sampling);
    return;
  }
  let conversation = currentConversation();
  if (!conversation) {
    conversation = { id: newId(), title: titleFrom(text), createdAt: Date.now(), updatedAt: Date.now(), messages: [] };
    store.conversations.push(conversation);
    store.currentId = conversation.id;
  }
  conversation.messages.push({ id: newId(), role: 'user', content: text });
  ui.input.value = '';
  autosize(ui.input);
  generate(conversation, sampling.params);
}

function showSettingsError({ error, input }) {
  openSettings(input);
  ui.settingsError.textContent = error;
  ui.settingsError.hidden = false;
}

function regenerate(conversation) {
  if (generation) return;
  const sampling = samplingParameters();
  if (sampling.error) {
    showSettingsError(sampling);
    return;
  }
  while (conversation.messages.at(-1)?.role === 'assistant') conversation.messages.pop();
  if (!conversation.messages.length) return;
  generate(conversation, sampling.params);
}

function startEdit(conversation, message, article) {
  if (generation) return;
  const bubble = article.querySelector('.msg-bubble');
  const editor = h('textarea', { className: 'edit-input', rows: 3, 'aria-label': 'Edit the message' });
  editor.value = message.content;
  const cancel = () => renderConversation();
  const submit = () => {
    if (generation || !editor.value.trim()) return;
    const sampling = samplingParameters();
    if (sampling.error) {
      showSettingsError(sampling);
      return;
    }
    const index = conversation.messages.indexOf(message);
    if (index < 0) return;
    conversation.messages = conversation.messages.slice(0, index);
    conversation.messages.push({ id: newId(), role: 'user', content: editor.value });
    if (index === 0) conversation.title = titleFrom(editor.value);
    generate(conversation, sampling.params);
  };
  editor.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    } else if (event.key === 'Escape') {
      event.preventDefault();
      event.stopPropagation();
      cancel();
    }
  });
  const buttons = h('div', { className: 'edit-buttons' },
    h('button', { type: 'button', className: 'button button-small', onclick: cancel, text: 'Cancel' }),
    h('button', { type: 'button', className: 'button button-small button-primary', onclick: submit, text: 'Send' }));
  bubble.replaceChildren(editor, buttons);
  article.classList.add('editing');
  article.querySelector('.msg-actions')?.remove();
  autosize(editor);
  editor.addEventListener('input', () => autosize(editor));
  editor.focus();
  editor.setSelectionRange(editor.value.length, editor.value.length);
}

/** The request's messages: the system prompt, then the conversation up to `upTo`. */
function requestMessages(conversation, upTo) {
  const messages = [];
  const system = settings.systemPrompt.trim();
  if (system) messages.push({ role: 'system', content: settings.systemPrompt });
  for (const message of conversation.messages.slice(0, upTo)) {
    // Failed answers with nothing in them are not part of the dialogue.
    if (message.content) messages.push({ role: message.role, content: message.content });
  }
  return messages;
}

async function generate(conversation, sampling) {
  const answer = { id: newId(), role: 'assistant', content: '', state: 'streaming' };
  conversation.messages.push(answer);
  conversation.updatedAt = Date.now();
  const body = { messages: requestMessages(conversation, conversation.messages.length - 1), ...sampling };
  if (settings.model) body.model = settings.model;

  const controller = new AbortController();
  generation = { conversationId: conversation.id, messageId: answer.id, controller };
  saveStore();
  render();
  setGenerating(true);
  announce('Generating an answer');

  const started = performance.now();
  let firstAt = null;
  let lastAt = null;
  let chunks = 0;
  let usage = null;
  let finishReason = null;
  let savedAt = started;
  try {
    for await (const chunk of streamChat({ body, apiKey: settings.apiKey, signal: controller.signal })) {
      if (chunk.usage) usage = chunk.usage;
      if (chunk.model) answer.model = chunk.model;
      const choice = chunk.choices?.[0];
      const delta = choice?.delta?.content;
      if (delta) {
        const now = performance.now();
        firstAt ??= now;
        lastAt = now;
        chunks += 1;
        answer.content += delta;
        scheduleMessageRender(answer);
        if (now - savedAt > SAVE_INTERVAL_MS) {
          savedAt = now;
          saveStore();
        }
      }
      if (choice?.finish_reason) finishReason = choice.finish_reason;
    }
    answer.state = 'done';
  } catch (err) {
    if (err?.name === 'AbortError') {
      answer.state = 'stopped';
    } else {
      answer.state = 'error';
      answer.error = describeError(err);
    }
  }

  const stats = { finishReason };
  if (firstAt !== null) stats.ttftMs = firstAt - started;
  const tokens = usage?.completion_tokens ?? null;
  if (tokens !== null) stats.completionTokens = tokens;
  const counted = tokens ?? chunks;
  if (counted > 1 && lastAt > firstAt) {
    stats.tokensPerSecond = (counted - 1) / ((lastAt - firstAt) / 1000);
    stats.approximate = tokens === null;
  }
  if (usage) {
    stats.promptTokens = usage.prompt_tokens;
    stats.cachedTokens = usage.prompt_tokens_details?.cached_tokens ?? 0;
  }
  answer.stats = stats;

  generation = null;
  conversation.updatedAt = Date.now();
  saveStore();
  setGenerating(false);
  renderQueued.delete(answer);
  if (store.currentId === conversation.id) renderConversation();
  renderSidebar();
  if (answer.state === 'error') announce(answer.error);
  else announce(answer.state === 'stopped' ? 'Answer stopped' : 'Answer complete');
}

function stop() {
  generation?.controller.abort();
}

// ---------------------------------------------------------------- layout

function autosize(textarea) {
  textarea.style.height = 'auto';
  textarea.style.height = `${Math.min(textarea.scrollHeight + 2, 240)}px`;
}

const narrow = window.matchMedia('(max-width: 760px)');

function openSidebar() {
  ui.app.classList.add('sidebar-open');
  ui.menuButton.setAttribute('aria-expanded', 'true');
  ui.newChat.focus();
}

function closeSidebar() {
  if (!ui.app.classList.contains('sidebar-open')) return;
  ui.app.classList.remove('sidebar-open');
  ui.menuButton.setAttribute('aria-expanded', 'false');
  if (narrow.matches) ui.menuButton.focus();
}

// ---------------------------------------------------------------- wiring

ui.send.addEventListener('click', () => (generation ? stop() : send()));
ui.input.addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    if (!generation) send();
  } else if (event.key === 'Escape' && generation) {
    event.preventDefault();
    stop();
  }
});
ui.input.addEventListener('input', () => autosize(ui.input));
ui.newChat.addEventListener('click', newChat);
ui.menuButton.addEventListener('click', () => (ui.app.classList.contains('sidebar-open') ? closeSidebar() : openSidebar()));
ui.sidebarClose.addEventListener('click', closeSidebar);
ui.backdrop.addEventListener('click', closeSidebar);
ui.sidebar.addEventListener('keydown', (event) => {
  if (event.key === 'Escape') closeSidebar();
});
ui.settingsButton.addEventListener('click', () => openSettings());
ui.settingsClose.addEventListener('click', closeSettings);
ui.settingsDone.addEventListener('click', closeSettings);
ui.settings.addEventListener('click', (event) => {
  if (event.target === ui.settings) closeSettings(); // a click on the backdrop
});
ui.bannerAction.addEventListener('click', () => bannerAction?.());

bindSetting(ui.systemPrompt, 'systemPrompt');
bindSetting(ui.temperature, 'temperature');
bindSetting(ui.topP, 'topP');
bindSetting(ui.maxTokens, 'maxTokens');
bindSetting(ui.seed, 'seed');
bindSetting(ui.apiKey, 'apiKey');
const reloadModelsIfKeyChanged = () => {
  if (settings.apiKey !== modelsKey) loadModels();
};
ui.apiKey.addEventListener('change', reloadModelsIfKeyChanged);
ui.modelSelect.addEventListener('change', () => {
  settings.model = ui.modelSelect.value;
  ui.modelPill.textContent = settings.model;
  saveSettings();
});
ui.apiKeyToggle.addEventListener('click', () => {
  const show = ui.apiKey.type === 'password';
  ui.apiKey.type = show ? 'text' : 'password';
  ui.apiKeyToggle.textContent = show ? 'Hide' : 'Show';
  ui.apiKeyToggle.setAttribute('aria-pressed', String(show));
});
ui.settings.addEventListener('close', () => {
  reloadModelsIfKeyChanged();
  ui.settingsError.hidden = true;
  ui.input.focus();
});

// Another tab changed the conversations: show its version unless we are mid-answer.
window.addEventListener('storage', (event) => {
  if (event.key === STORE_KEY && !generation) {
    store = loadStore();
    render();
  }
});

fillSettingsForm();
render();
loadModels();
ui.input.focus();
