// Roles in front of the Dagster webserver (nginx njs module, libnginx-mod-http-js).
//
// roleFile (js_set): the htpasswd file of the role whose file names the user; nginx's auth_basic then checks the
// password against that file, so a request that gets past auth_basic is known to be that role's user.
// guard (js_content): an operator's request goes to Dagster as it is; a viewer's only when it cannot change
// anything. Allow-list: a viewer may GET/HEAD anything, and POST only to .../graphql a document whose every
// definition is a query, a subscription or a fragment; every `query` in the URL, and in a JSON body (one object
// or a batch of them) or an application/graphql body, must pass. Whatever cannot be read for sure (bad JSON, a
// body not in memory, an unterminated string, an unknown character) is refused: 403, never passed on.
// WebSockets: Dagster's /graphql websocket executes only subscriptions (graphql-core `subscribe` resolves every
// document against the Subscription type, so a mutation sent there fails); nginx cannot read websocket frames,
// so that is what keeps them read-only, and the project's tests check it through this proxy.

import fs from 'fs';

function usersOf(path) {
    let text;
    try {
        text = fs.readFileSync(path, 'utf8');
    } catch (e) {
        return [];
    }
    return text.split('\n').map(line => line.split(':')[0].trim()).filter(name => name && name[0] !== '#');
}

function roleFile(r) {
    // Decided once per request (js_var $mp_role_decided): auth_basic and the guard must see the same file even
    // if someone edits the files in between.
    if (r.variables.mp_role_decided) {
        return r.variables.mp_role_decided;
    }
    const user = r.variables.remote_user || '';
    const operators = r.variables.mp_operator_htpasswd;
    let file = r.variables.mp_viewer_htpasswd;  // a user in neither file fails auth_basic against it: 401
    if (user && usersOf(operators).indexOf(user) >= 0) {
        file = operators;
    }
    r.variables.mp_role_decided = file;
    return file;
}

function role(r) {
    return r.variables.mp_role_file === r.variables.mp_operator_htpasswd ? 'operator' : 'viewer';
}

// --- GraphQL: just enough of the lexer to find every top-level definition's kind --------------------------------

const PUNCT = '!$&()[]{}:=@|';

function tokens(src) {
    const out = [];
    let i = 0;
    const n = src.length;
    while (i < n) {
        const c = src[i];
        if (c === ' ' || c === '\t' || c === '\n' || c === '\r' || c === ',' || c === '\ufeff') {
            i++;
        } else if (c === '#') {
            while (i < n && src[i] !== '\n' && src[i] !== '\r') i++;
        } else if (src.startsWith('"""', i)) {
            const end = blockStringEnd(src, i + 3);
            if (end < 0) throw new Error('unterminated block string');
            out.push('"');
            i = end;
        } else if (c === '"') {
            i++;
            while (true) {
                if (i >= n || src[i] === '\n' || src[i] === '\r') throw new Error('unterminated string');
                if (src[i] === '\\') { i += 2; continue; }
                if (src[i] === '"') { i++; break; }
                i++;
            }
            out.push('"');
        } else if (src.startsWith('...', i)) {
            out.push('...');
            i += 3;
        } else if (PUNCT.indexOf(c) >= 0) {
            out.push(c);
            i++;
        } else if (/[_A-Za-z]/.test(c)) {
            const m = /^[_A-Za-z][_0-9A-Za-z]*/.exec(src.slice(i, i + 256));
            if (!m || m[0].length >= 256) throw new Error('name too long');
            out.push('name:' + m[0]);
            i += m[0].length;
        } else if (/[-0-9]/.test(c)) {
            const m = /^-?[0-9]+(\.[0-9]+)?([eE][+-]?[0-9]+)?/.exec(src.slice(i, i + 256));
            if (!m) throw new Error('bad number');
            out.push('0');
            i += m[0].length;
        } else {
            throw new Error('unexpected character');
        }
    }
    return out;
}

function blockStringEnd(src, i) {
    while (i < src.length) {
        if (src.startsWith('\\"""', i)) { i += 4; continue; }
        if (src.startsWith('"""', i)) return i + 3;
        i++;
    }
    return -1;
}

// Why `query` is not a read-only document (null when it is): every top-level definition must be a query
// (`query ...` or a bare `{ ... }`), a subscription or a fragment.
function refusal(query) {
    if (typeof query !== 'string') return 'the query is not a string';
    let list;
    try {
        list = tokens(query);
    } catch (e) {
        return 'the query cannot be read (' + e.message + ')';
    }
    if (!list.length) return 'the query is empty';
    let i = 0;
    while (i < list.length) {
        const head = list[i];
        if (head !== '{' && head !== 'name:query' && head !== 'name:subscription' && head !== 'name:fragment') {
            return head === 'name:mutation' ? 'it is a mutation' : 'it holds a definition that is not a query';
        }
        // Skip to the end of this definition: the `{...}` block that closes at depth 0 outside any (...) or [...].
        let depth = 0;
        let done = false;
        while (i < list.length && !done) {
            const t = list[i++];
            if (t === '{' || t === '(' || t === '[') depth++;
            else if (t === '}' || t === ')' || t === ']') {
                depth--;
                if (depth < 0) return 'the query has unbalanced brackets';
                if (depth === 0 && t === '}') done = true;
            }
        }
        if (!done) return 'the query has unbalanced brackets';
    }
    return null;
}

// Python's parse_qsl, as Starlette reads the URL: '&'-separated, '+' is a space, %XX decoded.
function queryArgs(args) {
    const values = [];
    const parts = (args || '').split('&');
    for (let k = 0; k < parts.length; k++) {
        const part = parts[k];
        const eq = part.indexOf('=');
        const rawName = eq < 0 ? part : part.slice(0, eq);
        let name;
        let value;
        try {
            name = decodeURIComponent(rawName.replace(/\+/g, ' '));
            value = eq < 0 ? '' : decodeURIComponent(part.slice(eq + 1).replace(/\+/g, ' '));
        } catch (e) {
            if (rawName.toLowerCase().indexOf('q') >= 0) return null;  // may be `query`, cannot be read: refuse
            continue;
        }
        if (name === 'query') values.push(value);
    }
    return values;
}

function bodyRefusal(r) {
    const type = r.headersIn['Content-Type'] || '';
    // Dagster reads the body as JSON when the type mentions application/json, else as the query itself when it
    // mentions application/graphql, else not at all (the query comes from the URL, checked already).
    if (type.indexOf('application/json') < 0 && type.indexOf('application/graphql') < 0) return null;
    const text = r.requestText;
    if (text === undefined || text === null) return 'the request body could not be read';
    if (type.indexOf('application/json') < 0) return refusal(text);
    let data;
    try {
        data = JSON.parse(text);
    } catch (e) {
        return 'the request body is not JSON';
    }
    const requests = Array.isArray(data) ? data : [data];
    if (!requests.length) return 'the batch is empty';
    for (let k = 0; k < requests.length; k++) {
        const one = requests[k];
        if (one === null || typeof one !== 'object' || Array.isArray(one)) return 'a request is not a JSON object';
        if (one.query === undefined && (one.extensions !== undefined || one.id !== undefined)) {
            return 'persisted queries are not accepted';
        }
        const why = refusal(one.query);
        if (why) return why;
    }
    return null;
}

function viewerRefusal(r) {
    const method = r.method;
    if (method !== 'GET' && method !== 'HEAD' && method !== 'POST') return 'only reads are allowed';
    const inUrl = queryArgs(r.variables.args);
    if (inUrl === null) return 'the URL cannot be read';
    for (let k = 0; k < inUrl.length; k++) {
        const why = refusal(inUrl[k]);
        if (why) return why;
    }
    if (method !== 'POST') return null;
    if (!/\/graphql$/.test(r.uri)) return 'only GraphQL queries may be posted';
    return bodyRefusal(r);
}

function forbid(r, why) {
    r.headersOut['Content-Type'] = 'application/json';
    const message = 'forbidden: the viewer role may not change anything (' + why + '); ' +
        'launching, re-executing, terminating and reloading need the operator role';
    r.return(403, JSON.stringify({errors: [{message: message}]}) + '\n');
}

function guard(r) {
    if (role(r) === 'operator') {
        r.internalRedirect('@dagster');
        return;
    }
    const why = viewerRefusal(r);
    if (why) {
        forbid(r, why);
        return;
    }
    r.internalRedirect('@dagster');
}

export default {roleFile, guard, refusal};
