// A small client for llama-serve's OpenAI-compatible API, written to be read:
// it is all the chat page needs, and it works against any OpenAI-style server.
//
//   for await (const chunk of streamChat({ body: { messages, max_tokens: 64 } })) {
//     process.stdout.write(chunk.choices[0]?.delta?.content ?? '');
//   }
//
// Streaming uses `fetch` and a ReadableStream reader over Server-Sent Events:
// one `data: {json}` event per chunk, `data: [DONE]` at the end. Aborting the
// AbortSignal closes the connection, and the server cancels the generation.

/** A failed request, with what the server said about it. */
export class ApiError extends Error {
  constructor({ status = 0, message, type = null, code = null, param = null, retryAfter = null }) {
    super(message);
    this.name = 'ApiError';
    this.status = status;
    this.type = type;
    this.code = code;
    this.param = param;
    /** Seconds, from a 429's or 503's `Retry-After`. */
    this.retryAfter = retryAfter;
  }
}

function headers({ apiKey, body }) {
  const result = { Accept: body?.stream ? 'text/event-stream' : 'application/json' };
  if (body !== undefined) result['Content-Type'] = 'application/json';
  if (apiKey) result.Authorization = `Bearer ${apiKey}`;
  return result;
}

function retryAfterSeconds(response) {
  const value = response.headers.get('Retry-After');
  if (!value) return null;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds);
  const date = Date.parse(value);
  return Number.isNaN(date) ? null : Math.max(0, Math.round((date - Date.now()) / 1000));
}

/** An ApiError from a non-2xx response, reading OpenAI's `{"error": {...}}` body. */
async function errorFromResponse(response) {
  let text = '';
  try {
    text = await response.text();
  } catch {
    // The body is optional; the status alone still says something.
  }
  let detail = null;
  try {
    detail = JSON.parse(text)?.error ?? null;
  } catch {
    // Not JSON (a proxy's HTML error page, say): fall back to the status text.
  }
  const message =
    (typeof detail?.message === 'string' && detail.message) ||
    (typeof detail === 'string' && detail) ||
    text.trim().slice(0, 300) ||
    response.statusText ||
    `HTTP ${response.status}`;
  return new ApiError({
    status: response.status,
    message,
    type: detail?.type ?? null,
    code: detail?.code ?? null,
    param: detail?.param ?? null,
    retryAfter: retryAfterSeconds(response),
  });
}

async function request(path, { apiKey, signal, body }) {
  let response;
  try {
    response = await fetch(path, {
      method: body === undefined ? 'GET' : 'POST',
      headers: headers({ apiKey, body }),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
      cache: 'no-store',
    });
  } catch (err) {
    if (err?.name === 'AbortError') throw err;
    throw new ApiError({ status: 0, message: String(err?.message || err) });
  }
  if (!response.ok) throw await errorFromResponse(response);
  return response;
}

/** `GET /v1/models`: the ids of the served models. */
export async function listModels({ apiKey, signal } = {}) {
  const response = await request('v1/models', { apiKey, signal });
  const json = await response.json();
  return (json.data ?? []).map((model) => model.id);
}

/**
 * Incremental Server-Sent Events parser (the WHATWG algorithm, minus ids and
 * retry): feed it decoded text in any pieces; it calls `onEvent({event, data})`
 * for each complete event. Comments (`: keep-alive`) are skipped.
 */
export function createSseParser(onEvent) {
  let buffer = '';
  let data = [];
  let event = '';
  const dispatch = () => {
    if (data.length > 0) onEvent({ event: event || 'message', data: data.join('\n') });
    data = [];
    event = '';
  };
  const line = (text) => {
    if (text === '') return dispatch();
    if (text.startsWith(':')) return undefined;
    const colon = text.indexOf(':');
    const field = colon === -1 ? text : text.slice(0, colon);
    let value = colon === -1 ? '' : text.slice(colon + 1);
    if (value.startsWith(' ')) value = value.slice(1);
    if (field === 'data') data.push(value);
    else if (field === 'event') event = value;
    return undefined;
  };
  return {
    push(text) {
      buffer += text;
      for (;;) {
        const match = /\r\n|\r|\n/.exec(buffer);
        // A lone trailing \r may be the first half of \r\n: wait for more.
        if (!match || (match[0] === '\r' && match.index === buffer.length - 1)) break;
        line(buffer.slice(0, match.index));
        buffer = buffer.slice(match.index + match[0].length);
      }
    },
    /** End of stream: a final event without its blank line is discarded, as browsers do. */
    end() {
      buffer = '';
      data = [];
      event = '';
    },
  };
}

/**
 * `POST /v1/chat/completions` with `stream: true`: yields each chunk as
 * parsed JSON, ending at `[DONE]`. Throws an ApiError for an error status or
 * an error event in the stream, and the AbortError if `signal` aborts.
 */
export async function* streamChat({ body, apiKey, signal }) {
  const response = await request('v1/chat/completions', {
    apiKey,
    signal,
    body: { ...body, stream: true, stream_options: { include_usage: true } },
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  const events = [];
  const parser = createSseParser((event) => events.push(event));
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
      while (events.length > 0) {
        const { event, data } = events.shift();
        if (data === '[DONE]') return;
        let json;
        try {
          json = JSON.parse(data);
        } catch {
          throw new ApiError({ status: response.status, message: `the server sent a malformed event: ${data.slice(0, 200)}` });
        }
        if (event === 'error' || json?.error) {
          const detail = json.error ?? {};
          throw new ApiError({
            status: response.status,
            message: detail.message || 'the server reported an error during the answer',
            type: detail.type ?? null,
            code: detail.code ?? null,
            param: detail.param ?? null,
          });
        }
        yield json;
      }
    }
    throw new ApiError({ status: response.status, message: 'the connection closed before the answer was complete' });
  } finally {
    parser.end();
    // Closes the connection if we stop early (abort, error, or the caller's break).
    reader.cancel().catch(() => {});
  }
}

/** A sentence for a person: what went wrong and what to do about it. */
export function describeError(err) {
  if (!(err instanceof ApiError)) return `Something went wrong: ${err?.message || err}`;
  const said = err.message.replace(/\.?$/, '.');
  switch (err.status) {
    case 0:
      return `Could not reach the server (${err.message}). Is it running?`;
    case 401:
    case 403:
      return `The server refused the API key (${err.status}): ${said} Set the key in Settings.`;
    case 413:
      return `The conversation is too large for the server (413): ${said} Start a new chat or shorten it.`;
    case 429: {
      const wait = err.retryAfter === null ? 'in a moment' : `in ${err.retryAfter} s`;
      return `The server is busy (429): ${said} Try again ${wait}.`;
    }
    case 503:
      return `The server is not taking requests right now (503): ${said}`;
    case 504:
      return `The answer took longer than the server allows (504): ${said}`;
    default:
      break;
  }
  if (err.code === 'context_length_exceeded') {
    return `The conversation is too long for the model's context: ${said} Start a new chat, shorten a message, or lower Max tokens.`;
  }
  if (err.status >= 500) return `The server had an error (${err.status}): ${said}`;
  if (err.status >= 400) return `The server rejected the request (${err.status}): ${said}`;
  return `The answer stopped with an error: ${said}`;
}
