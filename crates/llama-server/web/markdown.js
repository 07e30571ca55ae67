// Markdown for model answers, rendered straight into DOM nodes.
//
// Safety: nothing here ever parses HTML. Every piece of the source becomes a
// Text node (document.createTextNode / textContent), so `<script>`,
// `<img onerror=...>` or any other markup in an answer is shown as the
// characters it is made of. The only attribute taken from the source is a
// link's href, and only for http:, https: and mailto: URLs.
//
// What it understands: fenced code blocks (``` or ~~~, kept verbatim), inline
// code (kept verbatim), headings, paragraphs (single newlines kept), bullet
// and numbered lists (nested by indentation), block quotes, horizontal rules,
// pipe tables, **bold**, *italic*, ~~strikethrough~~, [links](https://...),
// bare https:// URLs and backslash escapes. Underscores are never emphasis,
// so `__init__`, `snake_case` and `__dunder__` names stay as typed even
// outside code; neither is a lone `**` (as in `**kwargs`).

const FENCE_OPEN = /^( {0,3})(`{3,}|~{3,})(.*)$/;
const HEADING = /^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const LIST_ITEM = /^( {0,3})([-*+]|\d{1,9}[.)])([ \t]+(.*))?$/;
const TABLE_DELIMITER = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;
const SAFE_SCHEMES = new Set(['http:', 'https:', 'mailto:']);
const PUNCTUATION = /[!-/:-@[-`{-~]/;

/** Renders `source` as a DocumentFragment; never interprets HTML. */
export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  const lines = String(source ?? '').replace(/\r\n?/g, '\n').split('\n');
  for (const node of renderBlocks(lines)) fragment.append(node);
  return fragment;
}

function el(tag, ...children) {
  const node = document.createElement(tag);
  for (const child of children) {
    node.append(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return node;
}

function isBlank(line) {
  return /^[ \t]*$/.test(line);
}

function indentOf(line) {
  let width = 0;
  for (const ch of line) {
    if (ch === ' ') width += 1;
    else if (ch === '\t') width += 4 - (width % 4);
    else break;
  }
  return width;
}

/** Drops up to `width` columns of leading whitespace. */
function dedent(line, width) {
  let col = 0;
  let i = 0;
  while (i < line.length && col < width) {
    if (line[i] === ' ') col += 1;
    else if (line[i] === '\t') col += 4 - (col % 4);
    else break;
    i += 1;
  }
  return line.slice(i);
}

function isTableRow(line) {
  return line.includes('|');
}

function startsTable(lines, i) {
  return (
    i + 1 < lines.length &&
    isTableRow(lines[i]) &&
    TABLE_DELIMITER.test(lines[i + 1]) &&
    lines[i + 1].includes('-') &&
    splitRow(lines[i]).length === splitRow(lines[i + 1]).length
  );
}

/** A line that ends a paragraph because it starts another block. */
function startsBlock(lines, i) {
  const line = lines[i];
  return (
    FENCE_OPEN.test(line) ||
    HEADING.test(line) ||
    RULE.test(line) ||
    QUOTE.test(line) ||
    LIST_ITEM.test(line) ||
    startsTable(lines, i)
  );
}

function renderBlocks(lines) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i += 1;
      continue;
    }

    const fence = FENCE_OPEN.exec(line);
    if (fence && !(fence[2][0] === '`' && fence[3].includes('`'))) {
      const [, indent, marker, info] = fence;
      const body = [];
      i += 1;
      while (i < lines.length) {
        const close = /^ {0,3}(`{3,}|~{3,})[ \t]*$/.exec(lines[i]);
        if (close && close[1][0] === marker[0] && close[1].length >= marker.length) {
          i += 1;
          break;
        }
        body.push(dedent(lines[i], indent.length));
        i += 1;
      }
      out.push(codeBlock(body.join('\n'), info.trim().split(/\s+/)[0] || ''));
      continue;
    }

    const heading = HEADING.exec(line);
    if (heading) {
      const level = heading[1].length;
      out.push(el(`h${level}`, ...renderInline(heading[2] || '')));
      i += 1;
      continue;
    }

    if (RULE.test(line)) {
      out.push(el('hr'));
      i += 1;
      continue;
    }

    if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && !isBlank(lines[i])) {
        const quoted = QUOTE.exec(lines[i]);
        if (quoted) inner.push(quoted[1]);
        else if (startsBlock(lines, i)) break;
        else inner.push(lines[i]); // a lazy continuation line
        i += 1;
      }
      out.push(el('blockquote', ...renderBlocks(inner)));
      continue;
    }

    if (LIST_ITEM.test(line)) {
      const [list, next] = renderList(lines, i);
      out.push(list);
      i = next;
      continue;
    }

    if (startsTable(lines, i)) {
      const [table, next] = renderTable(lines, i);
      out.push(table);
      i = next;
      continue;
    }

    const paragraph = [line.trim()];
    i += 1;
    while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines, i)) {
      paragraph.push(lines[i].trim());
      i += 1;
    }
    out.push(el('p', ...renderInline(paragraph.join('\n'))));
  }
  return out;
}

function codeBlock(text, language) {
  const code = el('code', text);
  const safeLanguage = language.replace(/[^\w+#.-]/g, '').slice(0, 32);
  const pre = el('pre', code);
  pre.className = 'md-code';
  if (safeLanguage) {
    code.className = `language-${safeLanguage}`;
    pre.dataset.language = safeLanguage;
  }
  return pre;
}

function listKind(marker) {
  return /\d/.test(marker) ? `ol${marker.slice(-1)}` : `ul${marker}`;
}

function renderList(lines, start) {
  const first = LIST_ITEM.exec(lines[start]);
  const kind = listKind(first[2]);
  const ordered = kind.startsWith('ol');
  const list = el(ordered ? 'ol' : 'ul');
  if (ordered) {
    const number = parseInt(first[2], 10);
    if (number !== 1) list.start = number;
  }
  let i = start;
  while (i < lines.length) {
    const item = LIST_ITEM.exec(lines[i]);
    if (!item || listKind(item[2]) !== kind) break;
    const contentColumn = item[4] === undefined
      ? item[1].length + item[2].length + 1
      : item[1].length + item[2].length + Math.min(indentOf(item[3]), 4);
    const body = [item[4] ?? ''];
    i += 1;
    while (i < lines.length) {
      const current = lines[i];
      if (isBlank(current)) {
        // A blank line continues the item only if indented content follows.
        let j = i + 1;
        while (j < lines.length && isBlank(lines[j])) j += 1;
        if (j < lines.length && indentOf(lines[j]) >= contentColumn) {
          for (; i < j; i += 1) body.push('');
          continue;
        }
        break;
      }
      if (indentOf(current) >= contentColumn) {
        body.push(dedent(current, contentColumn));
        i += 1;
        continue;
      }
      if (startsBlock(lines, i)) break;
      body.push(current.trim()); // a lazy continuation line
      i += 1;
    }
    const li = el('li', ...renderBlocks(body));
    // A tight item (no blank line inside) shows its text without paragraph spacing.
    const loose = body.some((text, k) => k > 0 && k < body.length - 1 && isBlank(text));
    if (!loose) {
      for (const paragraph of [...li.children].filter((child) => child.tagName === 'P')) {
        paragraph.replaceWith(...paragraph.childNodes);
      }
    }
    list.append(li);
    // Blank lines between items of the same list keep the list going.
    let j = i;
    while (j < lines.length && isBlank(lines[j])) j += 1;
    if (j < lines.length && j > i) {
      const nextItem = LIST_ITEM.exec(lines[j]);
      if (nextItem && listKind(nextItem[2]) === kind) i = j;
    }
  }
  return [list, i];
}

/** Splits a table row on `|`, ignoring pipes escaped or inside code spans. */
function splitRow(line) {
  let text = line.trim();
  if (text.startsWith('|')) text = text.slice(1);
  if (text.endsWith('|') && !text.endsWith('\\|')) text = text.slice(0, -1);
  const cells = [];
  let cell = '';
  let i = 0;
  while (i < text.length) {
    const ch = text[i];
    if (ch === '\\' && text[i + 1] === '|') {
      cell += '|';
      i += 2;
    } else if (ch === '`') {
      let run = 0;
      while (text[i + run] === '`') run += 1;
      const ticks = '`'.repeat(run);
      const close = text.indexOf(ticks, i + run);
      const end = close === -1 ? i + run : close + run;
      cell += text.slice(i, end);
      i = end;
    } else if (ch === '|') {
      cells.push(cell.trim());
      cell = '';
      i += 1;
    } else {
      cell += ch;
      i += 1;
    }
  }
  cells.push(cell.trim());
  return cells;
}

function renderTable(lines, start) {
  const header = splitRow(lines[start]);
  const aligns = splitRow(lines[start + 1]).map((spec) => {
    const left = spec.startsWith(':');
    const right = spec.endsWith(':');
    if (left && right) return 'center';
    if (right) return 'right';
    if (left) return 'left';
    return '';
  });
  const cell = (tag, text, column) => {
    const node = el(tag, ...renderInline(text ?? ''));
    if (aligns[column]) node.className = `align-${aligns[column]}`;
    return node;
  };
  const thead = el('thead', el('tr', ...header.map((text, c) => cell('th', text, c))));
  const tbody = el('tbody');
  let i = start + 2;
  while (i < lines.length && !isBlank(lines[i]) && isTableRow(lines[i])) {
    const cells = splitRow(lines[i]);
    tbody.append(el('tr', ...header.map((_, c) => cell('td', cells[c], c))));
    i += 1;
  }
  const wrapper = el('div', el('table', thead, tbody));
  wrapper.className = 'md-table';
  return [wrapper, i];
}

// ---------------------------------------------------------------- inline

/**
 * Inline markdown of one block's text as DOM nodes. Exported for tests.
 * Tokens: text, code, link, br, and delimiter runs (`*`, `**`, `~~`) that
 * are paired afterwards; an unpaired delimiter is plain text.
 */
export function renderInline(text) {
  const tokens = tokenize(text, true);
  pairDelimiters(tokens);
  return build(tokens, 0, tokens.length);
}

function tokenize(text, allowLinks) {
  const tokens = [];
  let plain = '';
  const flush = () => {
    if (plain) tokens.push({ type: 'text', text: plain });
    plain = '';
  };
  let i = 0;
  while (i < text.length) {
    const ch = text[i];

    if (ch === '\\' && i + 1 < text.length && PUNCTUATION.test(text[i + 1])) {
      plain += text[i + 1];
      i += 2;
      continue;
    }

    if (ch === '\n') {
      flush();
      tokens.push({ type: 'br' });
      i += 1;
      continue;
    }

    if (ch === '`') {
      let run = 0;
      while (text[i + run] === '`') run += 1;
      const close = findBacktickRun(text, i + run, run);
      if (close === -1) {
        plain += '`'.repeat(run);
        i += run;
        continue;
      }
      let code = text.slice(i + run, close).replace(/\n/g, ' ');
      if (code.length >= 2 && code[0] === ' ' && code.at(-1) === ' ' && code.trim() !== '') {
        code = code.slice(1, -1);
      }
      flush();
      tokens.push({ type: 'code', text: code });
      i = close + run;
      continue;
    }

    if (allowLinks && ch === '[') {
      const link = parseLink(text, i);
      if (link) {
        flush();
        tokens.push({ type: 'link', href: link.href, children: link.children });
        i = link.end;
        continue;
      }
    }

    if (allowLinks && (ch === 'h' || ch === 'H') && /^https?:\/\//i.test(text.slice(i, i + 8))) {
      const prev = i > 0 ? text[i - 1] : ' ';
      const match = /^https?:\/\/[^\s<>"`]+/i.exec(text.slice(i));
      if (match && !/[\w/]/.test(prev)) {
        let url = match[0].replace(/[.,:;!?'")\]*~]+$/, '');
        // Keep a closing parenthesis that closes one inside the URL.
        const opens = (url.match(/\(/g) || []).length;
        const closes = (url.match(/\)/g) || []).length;
        if (opens > closes && match[0][url.length] === ')') url += ')';
        const href = safeHref(url);
        if (href) {
          flush();
          tokens.push({ type: 'link', href, children: [{ type: 'text', text: url }] });
          i += url.length;
          continue;
        }
      }
    }

    if (ch === '*' || (ch === '~' && text[i + 1] === '~')) {
      let run = 0;
      while (text[i + run] === ch) run += 1;
      if ((ch === '*' && run <= 2) || (ch === '~' && run === 2)) {
        const before = i > 0 ? text[i - 1] : ' ';
        const after = i + run < text.length ? text[i + run] : ' ';
        flush();
        tokens.push({
          type: 'delim',
          text: ch.repeat(run),
          canOpen: !/\s/.test(after),
          canClose: !/\s/.test(before),
        });
      } else {
        plain += ch.repeat(run);
      }
      i += run;
      continue;
    }

    plain += ch;
    i += 1;
  }
  flush();
  return tokens;
}

function findBacktickRun(text, from, length) {
  let i = from;
  while (i < text.length) {
    if (text[i] !== '`') {
      i += 1;
      continue;
    }
    let run = 0;
    while (text[i + run] === '`') run += 1;
    if (run === length) return i;
    i += run;
  }
  return -1;
}

/** `[text](url)` at `start`, or null when it is not a safe, complete link. */
function parseLink(text, start) {
  let depth = 0;
  let i = start;
  for (; i < text.length; i += 1) {
    const ch = text[i];
    if (ch === '\\') {
      i += 1;
    } else if (ch === '`') {
      let run = 0;
      while (text[i + run] === '`') run += 1;
      const close = findBacktickRun(text, i + run, run);
      i = close === -1 ? i + run - 1 : close + run - 1;
    } else if (ch === '[') {
      depth += 1;
    } else if (ch === ']') {
      depth -= 1;
      if (depth === 0) break;
    } else if (ch === '\n') {
      return null;
    }
  }
  if (depth !== 0 || text[i + 1] !== '(') return null;
  const target = /^\(\s*<?([^\s()<>]+)>?(?:\s+"[^"]*")?\s*\)/.exec(text.slice(i + 1));
  if (!target) return null;
  const href = safeHref(target[1]);
  if (!href) return null;
  const label = text.slice(start + 1, i);
  if (!label.trim()) return null;
  const children = tokenize(label, false);
  pairDelimiters(children);
  return { href, children, end: i + 1 + target[0].length };
}

function safeHref(raw) {
  try {
    const url = new URL(raw);
    return SAFE_SCHEMES.has(url.protocol) ? url.href : null;
  } catch {
    return null;
  }
}

/** Marks each opener with the index of its closer (`match`). */
function pairDelimiters(tokens) {
  const openers = [];
  tokens.forEach((token, index) => {
    if (token.type !== 'delim') return;
    if (token.canClose) {
      let k = openers.length - 1;
      while (k >= 0 && tokens[openers[k]].text !== token.text) k -= 1;
      // Emphasis needs content: `****` or `** **` stays literal.
      if (k >= 0 && openers[k] < index - 1) {
        tokens[openers[k]].match = index;
        token.closer = true;
        openers.length = k;
        return;
      }
    }
    if (token.canOpen) openers.push(index);
  });
}

const DELIM_TAGS = { '*': 'em', '**': 'strong', '~~': 'del' };

function build(tokens, from, to) {
  const nodes = [];
  for (let i = from; i < to; i += 1) {
    const token = tokens[i];
    switch (token.type) {
      case 'text':
        nodes.push(document.createTextNode(token.text));
        break;
      case 'br':
        nodes.push(el('br'));
        break;
      case 'code':
        nodes.push(el('code', token.text));
        break;
      case 'link': {
        const a = el('a', ...build(token.children, 0, token.children.length));
        a.href = token.href;
        a.target = '_blank';
        a.rel = 'noopener noreferrer nofollow';
        nodes.push(a);
        break;
      }
      case 'delim':
        if (token.match !== undefined) {
          nodes.push(el(DELIM_TAGS[token.text], ...build(tokens, i + 1, token.match)));
          i = token.match;
        } else {
          nodes.push(document.createTextNode(token.text));
        }
        break;
      default:
        break;
    }
  }
  return nodes;
}
