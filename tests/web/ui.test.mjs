// Browser tests of the built-in chat page, driving Debian's Chromium with
// playwright-core. Started by tests/tests/web_ui.rs, which runs the servers
// and passes their URLs in the environment:
//
//   WEB_UI_BASE          the bundled tiny model, no flags
//   WEB_UI_SLOW_BASE     random:134m (slow enough on a CPU to press Stop mid-answer)
//   WEB_UI_KEYED_BASE    tiny, --api-key $WEB_UI_API_KEY --max-queue 0 (401, then 429)
//   WEB_UI_TIMEOUT_BASE  tiny, --request-timeout 0.15 (an error event mid-stream)
//   WEB_UI_SCREENSHOTS   directory for the screenshots
//   WEB_UI_REPORT        JSON file for what the Rust side checks against the API
//   WEB_UI_CHROMIUM      the browser (default /usr/bin/chromium)
//   WEB_UI_ONLY          optional comma-separated test names, for development
//
// Each test runs in a fresh browser context (its own localStorage), fails on
// any Content-Security-Policy violation or uncaught page error, and leaves a
// screenshot named failure-<test>.png when it fails.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: this script is started by tests/tests/web_ui.rs`);
  return value;
}

const BASE = required('WEB_UI_BASE');
const SLOW_BASE = required('WEB_UI_SLOW_BASE');
const KEYED_BASE = required('WEB_UI_KEYED_BASE');
const API_KEY = required('WEB_UI_API_KEY');
const TIMEOUT_BASE = required('WEB_UI_TIMEOUT_BASE');
const SHOTS = required('WEB_UI_SCREENSHOTS');
const REPORT = required('WEB_UI_REPORT');
const CHROMIUM = process.env.WEB_UI_CHROMIUM || '/usr/bin/chromium';
const ONLY = process.env.WEB_UI_ONLY ? process.env.WEB_UI_ONLY.split(',') : null;

const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 390, height: 844 };
const STORE_KEY = 'llama-serve.chat.v1';
const SYSTEM_PROMPT = 'You are a terse assistant.';

fs.mkdirSync(SHOTS, { recursive: true });
const report = {};

// Playwright starts Chromium with a fresh temporary --user-data-dir of its own
// (and refuses one in `args`), so no profile leaks between runs.
const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
});

// ---------------------------------------------------------------- helpers

async function withPage(name, fn, { viewport = DESKTOP } = {}) {
  const context = await browser.newContext({
    viewport,
    permissions: ['clipboard-read', 'clipboard-write'],
  });
  await context.addInitScript(() => {
    window.__cspViolations = [];
    document.addEventListener('securitypolicyviolation', (event) => {
      window.__cspViolations.push(`${event.violatedDirective} ${event.blockedURI}`);
    });
  });
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  const problems = [];
  page.on('pageerror', (err) => problems.push(`uncaught: ${err.message}`));
  page.on('console', (message) => {
    if (/Content Security Policy/i.test(message.text())) problems.push(`csp: ${message.text()}`);
  });
  try {
    await fn(page, context);
    const violations = await page.evaluate(() => window.__cspViolations ?? []);
    assert.deepEqual([...problems, ...violations], [], 'the page broke its own policy or threw');
  } catch (err) {
    await page.screenshot({ path: path.join(SHOTS, `failure-${name}.png`) }).catch(() => {});
    throw err;
  } finally {
    await context.close();
  }
}

async function screenshot(page, name) {
  await page.mouse.move(1, page.viewportSize().height - 1); // no hover effects
  await page.screenshot({ path: path.join(SHOTS, name), animations: 'disabled' });
}

async function stored(page) {
  return page.evaluate((key) => JSON.parse(localStorage.getItem(key) ?? 'null'), STORE_KEY);
}

async function currentMessages(page) {
  const store = await stored(page);
  return store.conversations.find((c) => c.id === store.currentId).messages;
}

/** Waits for the page to list `model` (from /v1/models). */
async function expectModel(page, model) {
  await page.waitForFunction((m) => document.querySelector('#model-pill')?.textContent === m, model);
  assert.deepEqual(await page.$$eval('#model-select option', (options) => options.map((o) => o.value)), [model]);
}

async function setSettings(page, values) {
  await page.click('#settings-button');
  await page.waitForSelector('#settings[open]');
  for (const [id, value] of Object.entries(values)) await page.fill(`#${id}`, value);
  await page.click('#settings-done');
  await page.waitForSelector('#settings:not([open])', { state: 'attached' });
}

async function lastAnswerId(page) {
  return page.evaluate(() => [...document.querySelectorAll('#messages article[data-role=assistant]')].at(-1)?.dataset.id ?? null);
}

/** Runs `action`, then waits for a new answer to finish; returns its stored message. */
async function answerAfter(page, action, { timeout = 30_000 } = {}) {
  const before = await lastAnswerId(page);
  await action();
  const handle = await page.waitForFunction((previous) => {
    const answers = [...document.querySelectorAll('#messages article[data-role=assistant]')];
    const last = answers.at(-1);
    const app = document.getElementById('app');
    if (!last || last.dataset.id === previous || last.dataset.state === 'streaming' || app.classList.contains('generating')) return null;
    return last.dataset.id;
  }, before, { timeout });
  const id = await handle.jsonValue();
  const messages = await currentMessages(page);
  const message = messages.find((m) => m.id === id);
  assert.ok(message, `answer ${id} is in localStorage`);
  return message;
}

/** Records each distinct text the streaming answer shows, as painted. */
async function recordPaints(page) {
  await page.evaluate(() => {
    window.__paints = [];
    const observer = new MutationObserver(() => {
      const body = document.querySelector('#messages article[data-role=assistant][data-state=streaming] .msg-body');
      const text = body?.textContent ?? '';
      if (text && window.__paints.at(-1) !== text) window.__paints.push(text);
    });
    observer.observe(document.getElementById('messages'), { childList: true, subtree: true, characterData: true });
  });
}

async function paints(page) {
  return page.evaluate(() => window.__paints);
}

async function metrics(base) {
  const response = await fetch(`${base}/metrics`);
  assert.equal(response.status, 200);
  return response.text();
}

function sample(text, name) {
  for (const line of text.split('\n')) {
    if (line.startsWith(`${name} `)) return Number(line.slice(name.length + 1));
  }
  return 0;
}

const RUNNING = 'llama_serve_num_requests_running';
const CANCELLED = 'llama_serve_engine_requests_total{outcome="cancelled"}';

async function waitForRunning(base, want, timeoutMs) {
  const start = Date.now();
  for (;;) {
    const value = sample(await metrics(base), RUNNING);
    if (value === want) return Date.now() - start;
    if (Date.now() - start > timeoutMs) assert.fail(`${RUNNING} is ${value}, not ${want}, after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
}

async function statTexts(page, articleId) {
  return page.$$eval(`article[data-id="${articleId}"] .msg-meta .stat`, (stats) =>
    Object.fromEntries(stats.map((s) => [s.dataset.stat, s.textContent])));
}

function checkStats(message, texts, { cachedAtLeast = 0 } = {}) {
  const { stats } = message;
  assert.ok(stats.ttftMs > 0, `ttft ${stats.ttftMs}`);
  assert.ok(stats.tokensPerSecond > 0, `tokens/s ${stats.tokensPerSecond}`);
  assert.ok(stats.completionTokens > 0 && stats.promptTokens > 0, JSON.stringify(stats));
  assert.ok(stats.cachedTokens >= cachedAtLeast, `cached ${stats.cachedTokens} < ${cachedAtLeast}`);
  assert.match(texts.ttft, /^\d+(\.\d+)? (ms|s) to first token$/);
  assert.match(texts.speed, /^\d+\.\d tokens\/s$/);
  assert.equal(texts.tokens, `${stats.completionTokens} tokens`);
  assert.equal(texts.cached, `${stats.cachedTokens} of ${stats.promptTokens} prompt tokens cached`);
}

async function noHorizontalOverflow(page) {
  const { scroll, width } = await page.evaluate(() => ({ scroll: document.documentElement.scrollWidth, width: window.innerWidth }));
  assert.ok(scroll <= width, `the page is ${scroll}px wide in a ${width}px window`);
}

async function inViewport(page, selector) {
  const box = await page.locator(selector).boundingBox();
  const size = page.viewportSize();
  assert.ok(box, `${selector} is not rendered`);
  assert.ok(box.x >= 0 && box.y >= 0 && box.x + box.width <= size.width + 0.5 && box.y + box.height <= size.height + 0.5,
    `${selector} at ${JSON.stringify(box)} is outside the ${size.width}x${size.height} viewport`);
}

// ---------------------------------------------------------------- tests

const tests = [];
const test = (name, fn) => tests.push({ name, fn });

test('exchange', () => withPage('exchange', async (page) => {
  const requests = [];
  page.on('request', (request) => {
    if (request.url().endsWith('/v1/chat/completions')) {
      requests.push({ body: JSON.parse(request.postData()), auth: request.headers().authorization ?? null });
    }
  });
  const answers = [];
  const note = (message) => answers.push({
    request: requests.at(-1).body,
    content: message.content,
    completionTokens: message.stats.completionTokens,
  });

  await page.goto(`${BASE}/`);
  await expectModel(page, 'tiny-llama');
  assert.ok(await page.isVisible('#empty-state'));
  assert.equal(await page.evaluate(() => document.activeElement?.id), 'composer-input', 'the message box has focus on load');

  await setSettings(page, {
    'system-prompt': SYSTEM_PROMPT,
    temperature: '0.8',
    'top-p': '0.95',
    'max-tokens': '200',
    seed: '4242',
  });

  // Shift+Enter is a new line; Enter sends.
  await page.focus('#composer-input');
  await page.keyboard.type('Hello there!');
  await page.keyboard.press('Shift+Enter');
  await page.keyboard.type('What do __init__ and **kwargs do?');
  const typed = 'Hello there!\nWhat do __init__ and **kwargs do?';
  assert.equal(await page.inputValue('#composer-input'), typed);
  await recordPaints(page);
  const first = await answerAfter(page, () => page.keyboard.press('Enter'));
  note(first);
  assert.equal(await page.inputValue('#composer-input'), '', 'the box is cleared once sent');
  assert.equal(await page.textContent('article[data-role=user] .user-text'), typed);
  assert.equal(first.state, 'done');
  assert.ok(first.content.length > 0);

  // The answer was painted in several steps, not once at the end.
  const steps = await paints(page);
  assert.ok(steps.length >= 2, `the answer was painted ${steps.length} time(s): ${JSON.stringify(steps)}`);
  assert.ok(steps[0].length < first.content.length, 'the first paint held only part of the answer');

  // What was sent: the public API, with the settings as typed.
  assert.deepEqual(requests[0].body, {
    model: 'tiny-llama',
    messages: [
      { role: 'system', content: SYSTEM_PROMPT },
      { role: 'user', content: typed },
    ],
    temperature: 0.8,
    top_p: 0.95,
    max_tokens: 200,
    seed: 4242,
    stream: true,
    stream_options: { include_usage: true },
  });
  assert.equal(requests[0].auth, null, 'no Authorization header without a key');
  checkStats(first, await statTexts(page, first.id));

  // Copy puts the answer's text on the clipboard.
  const copy = page.locator(`article[data-id="${first.id}"] button[aria-label="Copy this answer"]`);
  await copy.click();
  await page.waitForFunction((id) => document.querySelector(`article[data-id="${id}"] button[aria-label="Copy this answer"]`).textContent === 'Copied', first.id);
  const clipboard = await page.evaluate(() => navigator.clipboard.readText());
  assert.equal(clipboard, first.content);

  // Regenerate: the same request again (same seed: the same answer), the
  // prompt now from the prefix cache, and still one answer in the thread.
  const again = await answerAfter(page, () => page.click('button[aria-label="Regenerate this answer"]'));
  note(again);
  assert.deepEqual(requests[1].body, requests[0].body);
  assert.equal(again.content, first.content);
  assert.notEqual(again.id, first.id);
  checkStats(again, await statTexts(page, again.id), { cachedAtLeast: 16 });
  assert.equal((await currentMessages(page)).length, 2);
  assert.equal(await page.locator('#messages article').count(), 2);
  await screenshot(page, 'desktop.png');
  await page.emulateMedia({ colorScheme: 'dark' });
  await screenshot(page, 'desktop-dark.png');
  await page.emulateMedia({ colorScheme: 'light' });

  // A reload keeps the conversation (and its figures); at phone width, too.
  const shown = await page.textContent(`article[data-id="${again.id}"] .msg-body`);
  await page.setViewportSize(PHONE);
  await page.reload();
  await page.waitForSelector(`article[data-id="${again.id}"] .msg-meta`);
  assert.equal(await page.textContent(`article[data-id="${again.id}"] .msg-body`), shown);
  assert.equal(await page.textContent('article[data-role=user] .user-text'), typed);
  assert.equal(await page.textContent('#conversation-title'), 'Hello there!');
  checkStats(again, await statTexts(page, again.id), { cachedAtLeast: 16 });
  await noHorizontalOverflow(page);
  await inViewport(page, '#composer-input');
  await inViewport(page, '#send-button');
  await inViewport(page, '#settings-button');
  assert.ok(!(await page.isVisible('#new-chat')), 'the conversation list is folded away on a phone');
  await screenshot(page, 'mobile.png');
  await page.click('#menu-button');
  await page.waitForFunction(() => document.activeElement?.id === 'new-chat');
  await page.waitForTimeout(250); // the slide-in
  await inViewport(page, '#new-chat');
  assert.equal(await page.locator('#conversation-list li').count(), 1);
  await screenshot(page, 'mobile-conversations.png');
  await page.keyboard.press('Escape');
  await page.waitForFunction(() => document.activeElement?.id === 'menu-button');
  await page.setViewportSize(DESKTOP);

  // Edit, then cancel with Escape: nothing is sent.
  await page.click('button[aria-label="Edit this message and resend it"]');
  assert.equal(await page.inputValue('.edit-input'), typed);
  assert.equal(await page.evaluate(() => document.activeElement?.className), 'edit-input');
  await page.keyboard.press('Escape');
  await page.waitForSelector('.edit-input', { state: 'detached' });
  assert.equal(requests.length, 2);

  // Edit and resend: the thread is cut at the edited message.
  await page.click('button[aria-label="Edit this message and resend it"]');
  await page.fill('.edit-input', 'Edited question: what is 2+2?');
  const edited = await answerAfter(page, () => page.keyboard.press('Enter'));
  note(edited);
  assert.deepEqual(requests[2].body.messages, [
    { role: 'system', content: SYSTEM_PROMPT },
    { role: 'user', content: 'Edited question: what is 2+2?' },
  ]);
  const afterEdit = await currentMessages(page);
  assert.deepEqual(afterEdit.map((m) => [m.role, m.role === 'user' ? m.content : m.id]), [
    ['user', 'Edited question: what is 2+2?'],
    ['assistant', edited.id],
  ]);
  assert.equal(await page.textContent('#conversation-title'), 'Edited question: what is 2+2?');

  // Several conversations: new, switch, delete.
  await page.click('#new-chat');
  assert.ok(await page.isVisible('#empty-state'));
  assert.equal(await page.textContent('#conversation-title'), 'New chat');
  await page.fill('#composer-input', 'A second conversation');
  const second = await answerAfter(page, () => page.keyboard.press('Enter'));
  note(second);
  assert.deepEqual(requests[3].body.messages.map((m) => m.content), [SYSTEM_PROMPT, 'A second conversation']);
  assert.deepEqual(await page.$$eval('#conversation-list .conversation-title', (t) => t.map((x) => x.textContent)),
    ['A second conversation', 'Edited question: what is 2+2?']);
  await page.click('#conversation-list li:nth-child(2) .conversation-open');
  assert.equal(await page.textContent('article[data-role=user] .user-text'), 'Edited question: what is 2+2?');
  assert.equal(await page.getAttribute('#conversation-list li:nth-child(2) .conversation-open', 'aria-current'), 'true');
  const remove = page.locator('#conversation-list li:nth-child(1) .conversation-delete');
  await remove.click();
  assert.equal((await stored(page)).conversations.length, 2, 'the first click only asks');
  assert.equal(await remove.getAttribute('aria-label'), 'Confirm: delete “A second conversation”');
  await remove.click();
  await page.waitForFunction(() => document.querySelectorAll('#conversation-list li').length === 1);
  const store = await stored(page);
  assert.deepEqual(store.conversations.map((c) => c.title), ['Edited question: what is 2+2?']);
  assert.equal(store.currentId, store.conversations[0].id);

  report.exchange = { answers, clipboard };
}));

test('stop', () => withPage('stop', async (page) => {
  await page.goto(`${SLOW_BASE}/`);
  await expectModel(page, 'random-134m');
  await setSettings(page, { 'max-tokens': '2000', seed: '7' });
  const before = await metrics(SLOW_BASE);

  // Stop with the button, a few paints into a long answer.
  await page.fill('#composer-input', 'Tell me a very long story.');
  await recordPaints(page);
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => window.__paints.length >= 3, null, { timeout: 60_000 });
  await waitForRunning(SLOW_BASE, 1, 5_000); // the server is generating it
  const stopButton = page.getByRole('button', { name: 'Stop' });
  assert.ok(await stopButton.isVisible(), 'the send button turned into Stop');
  await screenshot(page, 'streaming.png');
  await stopButton.click();
  await page.waitForSelector('#messages article[data-role=assistant][data-state=stopped]');
  const drainedMs = await waitForRunning(SLOW_BASE, 0, 5_000);
  const afterButton = await metrics(SLOW_BASE);
  assert.equal(sample(afterButton, CANCELLED) - sample(before, CANCELLED), 1, 'the server cancelled the generation');
  const generated = sample(afterButton, 'llama_serve_generation_tokens_total') - sample(before, 'llama_serve_generation_tokens_total');
  assert.ok(generated < 2000, `${generated} tokens generated: the answer ran to its end`);

  let [, stopped] = await currentMessages(page);
  assert.equal(stopped.state, 'stopped');
  assert.ok(stopped.content.length > 0, 'the partial answer is kept');
  assert.equal(await page.textContent('#send-label'), 'Send');
  assert.equal((await statTexts(page, stopped.id)).state, 'Stopped');
  assert.ok(await page.isEnabled('button[aria-label="Regenerate this answer"]'));

  // Regenerate it, then stop with Escape from the message box.
  await recordPaints(page);
  await page.click('button[aria-label="Regenerate this answer"]');
  await page.waitForFunction(() => window.__paints.length >= 2, null, { timeout: 60_000 });
  await page.focus('#composer-input');
  await page.keyboard.press('Escape');
  await page.waitForSelector('#messages article[data-role=assistant][data-state=stopped]');
  await waitForRunning(SLOW_BASE, 0, 5_000);
  assert.equal(sample(await metrics(SLOW_BASE), CANCELLED) - sample(before, CANCELLED), 2);
  [, stopped] = await currentMessages(page);
  assert.equal(stopped.state, 'stopped');

  // Stopped stays stopped across a reload.
  await page.reload();
  await page.waitForSelector('#messages article[data-role=assistant][data-state=stopped]');
  report.stop = { drainedMs, generatedBeforeStop: generated };
}));

test('api-key', () => withPage('api-key', async (page) => {
  const auths = [];
  const bodies = [];
  page.on('request', (request) => {
    if (request.url().includes('/v1/')) auths.push(request.headers().authorization ?? null);
    if (request.url().endsWith('/v1/chat/completions')) bodies.push(JSON.parse(request.postData()));
  });
  await page.goto(`${KEYED_BASE}/`);
  // The page itself needs no key; listing the models does.
  await page.waitForSelector('#banner:not([hidden])');
  assert.match(await page.textContent('#banner-text'), /refused the API key \(401\): incorrect or missing API key/);
  assert.equal(await page.textContent('#model-pill'), 'no model');

  await setSettings(page, { 'api-key': 'not-the-key', 'max-tokens': '8' });
  await page.waitForFunction(() => !document.getElementById('model-pill').textContent.includes('…'));
  assert.match(await page.textContent('#banner-text'), /\(401\)/);
  await page.fill('#composer-input', 'Hello?');
  const refused = await answerAfter(page, () => page.keyboard.press('Enter'));
  assert.equal(refused.state, 'error');
  assert.equal(refused.content, '');
  const error = await page.textContent(`article[data-id="${refused.id}"] .msg-error`);
  assert.equal(error, 'The server refused the API key (401): incorrect or missing API key: send it as `Authorization: Bearer <key>`. Set the key in Settings.');
  assert.equal(auths.at(-1), 'Bearer not-the-key');

  // The right key: the models load, and the request gets past the key check
  // (this server queues nothing, so it answers 429 with its Retry-After).
  await setSettings(page, { 'api-key': API_KEY });
  await expectModel(page, 'tiny-llama');
  assert.ok(await page.isHidden('#banner'));
  const busy = await answerAfter(page, () => page.click('button[aria-label="Retry this answer"]'));
  assert.equal(auths.at(-1), `Bearer ${API_KEY}`);
  assert.equal(busy.state, 'error');
  assert.equal(
    await page.textContent(`article[data-id="${busy.id}"] .msg-error`),
    'The server is busy (429): the server is overloaded (0 requests waiting); retry later. Try again in 1 s.',
  );
  // A failed answer is not sent back as part of the conversation.
  assert.deepEqual(bodies.at(-1).messages, [{ role: 'user', content: 'Hello?' }]);
  assert.equal(bodies.at(-1).max_tokens, 8);

  // The key is kept in this browser.
  await page.reload();
  await expectModel(page, 'tiny-llama');
  assert.equal(await page.evaluate(() => localStorage.getItem('llama-serve.api-key')), API_KEY);
  await page.click('#settings-button');
  assert.equal(await page.inputValue('#api-key'), API_KEY);
  assert.equal(await page.getAttribute('#api-key', 'type'), 'password');
  await page.click('#api-key-toggle');
  assert.equal(await page.getAttribute('#api-key', 'type'), 'text');
  await page.keyboard.press('Escape');
}));

test('server-errors', () => withPage('server-errors', async (page) => {
  await page.goto(`${TIMEOUT_BASE}/`);
  await expectModel(page, 'tiny-llama');

  // Too long for the context: the 400's reason, in words.
  await setSettings(page, { 'max-tokens': '1000' });
  await page.fill('#composer-input', 'Hi');
  const tooLong = await answerAfter(page, () => page.keyboard.press('Enter'));
  assert.equal(tooLong.state, 'error');
  assert.match(
    await page.textContent(`article[data-id="${tooLong.id}"] .msg-error`),
    /^The conversation is too long for the model's context: this model's maximum context length is 512 tokens, but you requested \d+ tokens .* Start a new chat, shorten a message, or lower Max tokens\.$/,
  );

  // An error event in the middle of the stream (the request timeout): the
  // text so far stays, the error is shown under it.
  await setSettings(page, { 'max-tokens': '' });
  const timedOut = await answerAfter(page, () => page.click('button[aria-label="Retry this answer"]'));
  assert.equal(timedOut.state, 'error');
  assert.equal(
    await page.textContent(`article[data-id="${timedOut.id}"] .msg-error`),
    'The answer stopped with an error: the request did not finish within the request timeout.',
  );
  assert.equal((await currentMessages(page)).length, 2, 'the retry replaced the failed answer');

  // A setting out of range is caught before sending.
  await setSettings(page, { temperature: '7' });
  await page.fill('#composer-input', 'Once more');
  await page.keyboard.press('Enter');
  await page.waitForSelector('#settings[open]');
  assert.equal(await page.textContent('#settings-error'), 'Temperature must be a number from 0 to 2.');
  assert.equal(await page.evaluate(() => document.activeElement?.id), 'temperature');
  assert.equal(await page.inputValue('#composer-input'), 'Once more', 'the message is kept');
}));

const HOSTILE = [
  'Outside code: <script>window.__xss = "script"</script> and <img src=x onerror="window.__xss = \'img\'"> and __init__ and **kwargs and snake_case_name.',
  '',
  'Inline: `__init__`, `**kwargs`, `<script>alert(1)</script>`, `<img src=x onerror=alert(1)>`',
  '',
  '```python',
  'class A:',
  '    def __init__(self, *args, **kwargs):',
  '        html = "<script>window.__xss = \'fence\'</script><img src=x onerror=\\"window.__xss = 1\\">"',
  '```',
  '',
  '**bold**, *italic*, [a link](https://example.com/docs) and [a trap](javascript:window.__xss=1).',
].join('\n');

const FENCED = [
  'class A:',
  '    def __init__(self, *args, **kwargs):',
  '        html = "<script>window.__xss = \'fence\'</script><img src=x onerror=\\"window.__xss = 1\\">"',
].join('\n');

test('markdown-is-text', () => withPage('markdown-is-text', async (page) => {
  // A conversation as the page stores it, holding a hostile "model answer";
  // the reload renders it through the page's own code path.
  await page.goto(`${BASE}/`);
  await page.evaluate(({ key, content }) => {
    const now = Date.now();
    localStorage.setItem(key, JSON.stringify({
      version: 1,
      currentId: 'c1',
      conversations: [{
        id: 'c1', title: 'Hostile', createdAt: now, updatedAt: now,
        messages: [
          { id: 'u1', role: 'user', content: 'Show me <b>markup</b> & <script>alert(2)</script>' },
          { id: 'a1', role: 'assistant', content, state: 'done' },
        ],
      }],
    }));
  }, { key: STORE_KEY, content: HOSTILE });
  await page.reload();
  await page.waitForSelector('article[data-id=a1] .msg-body p');
  await page.waitForTimeout(200); // would an injected handler have run?

  const result = await page.evaluate(() => {
    const root = document.getElementById('messages');
    const answer = root.querySelector('article[data-id=a1] .msg-body');
    const inMessages = (selector) => [...root.querySelectorAll(`article ${selector}`)];
    const attributes = inMessages('*').flatMap((el) => [...el.attributes].map((a) => a.name));
    return {
      xss: window.__xss ?? null,
      articles: root.querySelectorAll('article').length,
      scripts: inMessages('script, iframe, object, embed, link, style').length + document.querySelectorAll('script:not([src])').length,
      images: inMessages('img').length,
      handlers: attributes.filter((name) => name.startsWith('on')),
      paragraphs: [...answer.querySelectorAll(':scope > p')].map((p) => p.textContent),
      inlineCode: [...answer.querySelectorAll('p code')].map((c) => c.textContent),
      fenced: answer.querySelector('pre code')?.textContent,
      language: answer.querySelector('pre code')?.className,
      strong: [...answer.querySelectorAll('strong')].map((s) => s.textContent),
      em: [...answer.querySelectorAll('em')].map((s) => s.textContent),
      links: [...answer.querySelectorAll('a')].map((a) => [a.textContent, a.getAttribute('href'), a.rel]),
      user: root.querySelector('article[data-id=u1] .user-text').textContent,
      userElements: root.querySelector('article[data-id=u1] .user-text').childElementCount,
    };
  });
  assert.equal(result.xss, null, 'an injected script ran');
  assert.equal(result.articles, 2);
  assert.equal(result.scripts, 0);
  assert.equal(result.images, 0);
  assert.deepEqual(result.handlers, []);
  assert.equal(result.paragraphs[0],
    'Outside code: <script>window.__xss = "script"</script> and <img src=x onerror="window.__xss = \'img\'"> and __init__ and **kwargs and snake_case_name.');
  assert.equal(result.paragraphs[1], 'Inline: __init__, **kwargs, <script>alert(1)</script>, <img src=x onerror=alert(1)>');
  assert.deepEqual(result.inlineCode, ['__init__', '**kwargs', '<script>alert(1)</script>', '<img src=x onerror=alert(1)>']);
  assert.equal(result.fenced, FENCED);
  assert.equal(result.language, 'language-python');
  assert.deepEqual(result.strong, ['bold']);
  assert.deepEqual(result.em, ['italic']);
  assert.deepEqual(result.links, [['a link', 'https://example.com/docs', 'noopener noreferrer nofollow']]);
  assert.equal(result.paragraphs[2], 'bold, italic, a link and [a trap](javascript:window.__xss=1).');
  assert.equal(result.user, 'Show me <b>markup</b> & <script>alert(2)</script>');
  assert.equal(result.userElements, 0);
  await screenshot(page, 'markdown.png');

  // The renderer itself, case by case (the module the page uses).
  const cases = [
    ['# Title\n## Sub', '<h1>Title</h1><h2>Sub</h2>'],
    ['a\nb', '<p>a<br>b</p>'],
    ['- one\n- two\n  - nested\n\n3. three\n4. four', '<ul><li>one</li><li>two<ul><li>nested</li></ul></li></ul><ol start="3"><li>three</li><li>four</li></ol>'],
    ['1. **Step**\n   ```sh\n   ls *\n   ```', '<ol><li><strong>Step</strong><pre class="md-code" data-language="sh"><code class="language-sh">ls *</code></pre></li></ol>'],
    ['> quoted *text*\n\n---', '<blockquote><p>quoted <em>text</em></p></blockquote><hr>'],
    ['| a | b |\n|:--|--:|\n| `x|y` | 2 |', '<div class="md-table"><table><thead><tr><th class="align-left">a</th><th class="align-right">b</th></tr></thead><tbody><tr><td class="align-left"><code>x|y</code></td><td class="align-right">2</td></tr></tbody></table></div>'],
    ['```\nunclosed <b>\n**x**', '<pre class="md-code"><code>unclosed &lt;b&gt;\n**x**</code></pre>'],
    ['~~~\n```\n~~~', '<pre class="md-code"><code>```</code></pre>'],
    ['2 * 3 * 4 and ***x*** and ****', '<p>2 * 3 * 4 and ***x*** and ****</p>'],
    ['\\*not em\\* and a\\_b', '<p>*not em* and a_b</p>'],
    ['`` a ` b `` and `unclosed', '<p><code>a ` b</code> and `unclosed</p>'],
    ['~~gone~~ and ~single~', '<p><del>gone</del> and ~single~</p>'],
    ['See https://example.com/a_(b). Or <https://x.y>', '<p>See <a href="https://example.com/a_(b)" target="_blank" rel="noopener noreferrer nofollow">https://example.com/a_(b)</a>. Or &lt;<a href="https://x.y/" target="_blank" rel="noopener noreferrer nofollow">https://x.y</a>&gt;</p>'],
    ['[x](data:text/html,<b>) [y](vbscript:z) [z](/relative)', '<p>[x](data:text/html,&lt;b&gt;) [y](vbscript:z) [z](/relative)</p>'],
    ['```js onload="x"\ncode\n```', '<pre class="md-code" data-language="js"><code class="language-js">code</code></pre>'],
    ['```<img/src/onerror=alert(1)>\nx\n```', '<pre class="md-code" data-language="imgsrconerroralert1"><code class="language-imgsrconerroralert1">x</code></pre>'],
  ];
  const rendered = await page.evaluate(async (inputs) => {
    const { renderMarkdown } = await import('./markdown.js');
    return inputs.map((source) => {
      const box = document.createElement('div');
      box.append(renderMarkdown(source));
      return box.innerHTML;
    });
  }, cases.map(([source]) => source));
  cases.forEach(([source, expected], i) => assert.equal(rendered[i], expected, `markdown of ${JSON.stringify(source)}`));

  // The SSE reader the page uses: events split anywhere, CRLF, comments,
  // multi-line data, and an error event.
  const events = await page.evaluate(async () => {
    const { createSseParser } = await import('./api.js');
    const seen = [];
    const parser = createSseParser((event) => seen.push(event));
    const wire = ': keep-alive\r\n\r\ndata: {"a":1}\r\n\r\ndata:two\ndata: lines\n\nevent: error\ndata: {"error":{"message":"boom"}}\n\ndata: [DONE]\n\ndata: unterminated';
    for (let i = 0; i < wire.length; i += 3) parser.push(wire.slice(i, i + 3));
    parser.end();
    return seen;
  });
  assert.deepEqual(events, [
    { event: 'message', data: '{"a":1}' },
    { event: 'message', data: 'two\nlines' },
    { event: 'error', data: '{"error":{"message":"boom"}}' },
    { event: 'message', data: '[DONE]' },
  ]);
}));

test('keyboard', () => withPage('keyboard', async (page) => {
  await page.goto(`${BASE}/`);
  await expectModel(page, 'tiny-llama');
  await setSettings(page, { 'max-tokens': '16', seed: '1' });
  await page.focus('#composer-input');
  await page.keyboard.type('Keyboard only');
  await answerAfter(page, () => page.keyboard.press('Enter'));

  // Tab through the page from the top: every control is reachable, in order,
  // and shows where the focus is. (A click on the brand starts the order there.)
  await page.click('.brand');
  const order = [];
  for (let i = 0; i < 20; i += 1) {
    await page.keyboard.press('Tab');
    const focused = await page.evaluate(() => {
      const el = document.activeElement;
      const style = getComputedStyle(el);
      // The message box shows focus on its whole box (a ring around it).
      const ring = el.id === 'composer-input' && getComputedStyle(el.closest('.composer-box')).boxShadow.includes('0px 0px 0px 3px');
      return {
        name: el.getAttribute('aria-label') || el.textContent.trim() || el.id,
        outline: ring || (style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0),
      };
    });
    order.push(focused.name);
    assert.ok(focused.outline, `${focused.name} shows no focus outline`);
    if (focused.name === 'Send') break;
  }
  const expected = [
    'New chat', 'Keyboard only', 'Delete conversation “Keyboard only”',
    'Settings', 'Copy this message', 'Edit this message and resend it', 'Copy this answer',
    'Regenerate this answer', 'composer-input', 'Send',
  ];
  assert.deepEqual(order.filter((name) => !name.startsWith('Copy code')), expected);

  // Settings open from the keyboard, take focus, and close with Escape.
  await page.focus('#settings-button');
  await page.keyboard.press('Enter');
  await page.waitForSelector('#settings[open]');
  assert.equal(await page.evaluate(() => document.activeElement?.id), 'model-select');
  await page.keyboard.press('Escape');
  await page.waitForSelector('#settings:not([open])', { state: 'attached' });
  assert.equal(await page.evaluate(() => document.activeElement?.id), 'composer-input');

  // The skip link lands in the message box.
  await page.focus('.skip-link');
  assert.ok(await page.locator('.skip-link').isVisible(), 'the skip link shows when focused');
  await page.keyboard.press('Enter');
  assert.equal(await page.evaluate(() => document.activeElement?.id), 'composer-input');
}));

// ---------------------------------------------------------------- run

let failures = 0;
const started = Date.now();
for (const { name, fn } of tests) {
  if (ONLY && !ONLY.includes(name)) continue;
  const t0 = Date.now();
  try {
    await fn();
    console.log(`ok   ${name} (${Date.now() - t0} ms)`);
  } catch (err) {
    failures += 1;
    console.log(`FAIL ${name} (${Date.now() - t0} ms)\n${err?.stack || err}`);
  }
}
fs.writeFileSync(REPORT, JSON.stringify(report, null, 2));
await browser.close();
console.log(`${failures === 0 ? 'all passed' : `${failures} failed`} in ${Date.now() - started} ms`);
process.exit(failures === 0 ? 0 : 1);
