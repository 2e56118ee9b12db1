'use strict';
// Node.js client for imageshare.v1.ImageShareService.
//
// The proto is loaded at run time from the repository's protos/ folder, so the client
// can never drift from the contract. Defaults mirror the Python client: a 10 s deadline
// per listing or check, keepalive for long-lived processes, and a gRPC service config
// whose retryPolicy retries UNAVAILABLE. gRPC commits a streaming attempt once response
// headers arrive, so a stream that has started is never replayed: a failure after the
// first message surfaces as an ImageShareError with `interrupted: true`. A watch has no
// deadline and reconnects by itself (see ShareWatch).

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'imageshare/v1/image_share.proto';
const SERVICE = 'imageshare.v1.ImageShareService';
const DEFAULT_TIMEOUT_MS = 10_000;
const PUBLIC_GROUP = 'all';

const RETRY_POLICY = {
  maxAttempts: 3,
  initialBackoff: '0.1s',
  maxBackoff: '1s',
  backoffMultiplier: 2,
  retryableStatusCodes: ['UNAVAILABLE'],
};

const DEFAULT_SERVICE_CONFIG = {
  // Spreads calls over every address the target resolves to (a headless Service's pods);
  // with one address it is the same as pick_first.
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [
    { name: [{ service: SERVICE }], timeout: '10s', retryPolicy: RETRY_POLICY },
    // A watch runs until it ends: no default deadline (the entry naming the method wins).
    { name: [{ service: SERVICE, method: 'WatchImageShares' }], retryPolicy: RETRY_POLICY },
  ],
  retryThrottling: { maxTokens: 10, tokenRatio: 0.1 },
};

// How a watch reconnects after UNAVAILABLE (a drain, a connection at its age) or the
// server's watch limit: exponential backoff with full jitter, for as long as it is read.
const DEFAULT_RECONNECT = { maxAttempts: Infinity, initialBackoffMs: 100, maxBackoffMs: 10_000, multiplier: 2 };

function loadPackage() {
  const definition = protoLoader.loadSync(PROTO_FILE, {
    includeDirs: [PROTO_ROOT],
    keepCase: false,
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).imageshare.v1;
}

// The google.rpc error-detail messages the server sends in grpc-status-details-bin.
// Declared inline (field numbers from google/rpc/*.proto) so that no googleapis
// checkout is needed to read them.
const RPC_TYPES = protobuf.Root.fromJSON({
  nested: {
    google: {
      nested: {
        protobuf: {
          nested: {
            Any: { fields: { typeUrl: { type: 'string', id: 1 }, value: { type: 'bytes', id: 2 } } },
            Duration: { fields: { seconds: { type: 'int64', id: 1 }, nanos: { type: 'int32', id: 2 } } },
          },
        },
        rpc: {
          nested: {
            Status: {
              fields: {
                code: { type: 'int32', id: 1 },
                message: { type: 'string', id: 2 },
                details: { rule: 'repeated', type: 'google.protobuf.Any', id: 3 },
              },
            },
            ErrorInfo: {
              fields: {
                reason: { type: 'string', id: 1 },
                domain: { type: 'string', id: 2 },
                metadata: { keyType: 'string', type: 'string', id: 3 },
              },
            },
            BadRequest: {
              fields: { fieldViolations: { rule: 'repeated', type: 'FieldViolation', id: 1 } },
              nested: {
                FieldViolation: {
                  fields: { field: { type: 'string', id: 1 }, description: { type: 'string', id: 2 } },
                },
              },
            },
            RetryInfo: { fields: { retryDelay: { type: 'google.protobuf.Duration', id: 1 } } },
          },
        },
      },
    },
  },
});

/** reason/domain/metadata (ErrorInfo), fieldViolations (BadRequest), retryAfterMs (RetryInfo). */
function decodeDetails(serviceError) {
  const out = { reason: '', domain: '', errorMetadata: {}, fieldViolations: [], retryAfterMs: null };
  const raw = serviceError.metadata ? serviceError.metadata.get('grpc-status-details-bin') : [];
  if (!raw || raw.length === 0) return out;
  let status;
  try {
    status = RPC_TYPES.lookupType('google.rpc.Status').decode(raw[0]);
  } catch {
    return out; // unreadable details: the status code and message still stand
  }
  for (const detail of status.details) {
    const typeName = detail.typeUrl.slice(detail.typeUrl.lastIndexOf('/') + 1);
    if (typeName === 'google.rpc.ErrorInfo') {
      const info = RPC_TYPES.lookupType(typeName).decode(detail.value);
      Object.assign(out, { reason: info.reason, domain: info.domain, errorMetadata: { ...info.metadata } });
    } else if (typeName === 'google.rpc.BadRequest') {
      const bad = RPC_TYPES.lookupType(typeName).decode(detail.value);
      out.fieldViolations.push(...bad.fieldViolations.map((v) => ({ field: v.field, description: v.description })));
    } else if (typeName === 'google.rpc.RetryInfo') {
      const delay = RPC_TYPES.lookupType(typeName).decode(detail.value).retryDelay;
      if (delay) out.retryAfterMs = Number(delay.seconds) * 1000 + Math.floor((delay.nanos || 0) / 1e6);
    }
  }
  return out;
}

/**
 * A failed call: `code` is the numeric gRPC status, `codeName` e.g. "NOT_FOUND";
 * `reason`, `domain`, `errorMetadata` (e.g. the upstream requestId) come from
 * google.rpc.ErrorInfo, `fieldViolations` from google.rpc.BadRequest.
 */
class ImageShareError extends Error {
  constructor(serviceError, { interrupted = false, accountsReceived = 0 } = {}) {
    const codeName = grpc.status[serviceError.code] || 'UNKNOWN';
    const prefix = interrupted ? `stream interrupted after ${accountsReceived} accounts: ` : '';
    super(`${codeName}: ${prefix}${serviceError.details || serviceError.message}`);
    this.name = 'ImageShareError';
    this.code = serviceError.code;
    this.codeName = codeName;
    this.details = serviceError.details || '';
    this.metadata = serviceError.metadata;
    this.interrupted = interrupted;
    this.accountsReceived = accountsReceived;
    Object.assign(this, decodeDetails(serviceError));
  }
}

function toDate(timestamp) {
  if (!timestamp) return null;
  return new Date(Number(timestamp.seconds) * 1000 + Math.floor(timestamp.nanos / 1e6));
}

/**
 * One stream. `for await (const account of listing)` yields
 * `{ aliyunId, sharedTime }` (sharedTime a Date or null); `listing.metadata` is set once
 * the first message arrived (`await listing.start()` to wait for it).
 */
class ShareListing {
  constructor(openCall) {
    this._openCall = openCall;
    this._call = null;
    this._iterator = null;
    this._first = null;
    this.metadata = null;
    this.upstreamRequestIds = [];
    this.accountsReceived = 0;
  }

  async start() {
    if (this.metadata) return this.metadata;
    this._call = this._openCall();
    this._iterator = this._call[Symbol.asyncIterator]();
    let next;
    try {
      next = await this._iterator.next();
    } catch (err) {
      throw new ImageShareError(err);
    }
    if (next.done) {
      throw new ImageShareError({ code: grpc.status.INTERNAL, details: 'stream ended without a message' });
    }
    const first = next.value;
    this._first = first;
    this.metadata = {
      regionId: first.regionId,
      imageId: first.imageId,
      totalCount: first.totalCount,
      shareGroups: first.shareGroups.map((g) => g.group),
      isPublic: first.shareGroups.some((g) => g.group === PUBLIC_GROUP),
      cacheStatus: first.cacheStatus,
    };
    return this.metadata;
  }

  _take(message) {
    this.upstreamRequestIds.push(...message.upstreamRequestIds);
    this.accountsReceived += message.accounts.length;
    return message.accounts.map((a) => ({ aliyunId: a.aliyunId, sharedTime: toDate(a.sharedTime) }));
  }

  async *[Symbol.asyncIterator]() {
    await this.start();
    const first = this._first;
    this._first = null;
    if (first) yield* this._take(first);
    try {
      for (;;) {
        let next;
        try {
          next = await this._iterator.next();
        } catch (err) {
          throw new ImageShareError(err, { interrupted: true, accountsReceived: this.accountsReceived });
        }
        if (next.done) return;
        yield* this._take(next.value);
      }
    } finally {
      // Leaving the loop early (break, return, throw) must stop the server's work too.
      this.cancel();
    }
  }

  async collect() {
    const accounts = [];
    for await (const account of this) accounts.push(account);
    return { metadata: this.metadata, accounts, upstreamRequestIds: this.upstreamRequestIds };
  }

  cancel() {
    if (this._call) this._call.cancel();
  }
}

function toMetadata(metadata) {
  if (metadata instanceof grpc.Metadata) return metadata;
  const md = new grpc.Metadata();
  for (const [key, value] of Object.entries(metadata || {})) md.set(key, String(value));
  return md;
}

function account(message) {
  return { aliyunId: message.aliyunId, sharedTime: toDate(message.sharedTime) };
}

function sameAccount(a, b) {
  return a.aliyunId === b.aliyunId && (a.sharedTime?.getTime() ?? null) === (b.sharedTime?.getTime() ?? null);
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Backoff before reconnecting after `failures` failures in a row, or null when the error is
 * an answer (NOT_FOUND: the image was deleted; INVALID_ARGUMENT; ...).
 */
function reconnectDelayMs(error, failures, policy) {
  if (failures >= policy.maxAttempts) return null;
  const cap = Math.min(policy.maxBackoffMs, policy.initialBackoffMs * policy.multiplier ** Math.min(failures - 1, 20));
  const jittered = Math.random() * cap;
  if (error.code === grpc.status.UNAVAILABLE) return jittered;
  if (error.code === grpc.status.RESOURCE_EXHAUSTED && error.retryAfterMs !== null) {
    return Math.max(error.retryAfterMs, jittered);
  }
  return null;
}

/**
 * One image's share list and its changes. `for await (const change of watch)` yields
 * `{ snapshot, resumed, added: [{ aliyunId, sharedTime }], removed: [id], groupsAdded,
 * groupsRemoved, totalCount, readTime, becamePublic, becamePrivate, regionId, imageId }`:
 * first the whole list (`snapshot`), then each change. When the stream ends UNAVAILABLE
 * the watch reconnects with backoff and reports what changed meanwhile as one `resumed`
 * change, so none is missed; other errors are thrown. `accounts` (a Map by id),
 * `shareGroups` and `isPublic` hold the list as of the last change. Breaking out of the
 * loop or `cancel()` ends the watch.
 */
class ShareWatch {
  constructor(openCall, { regionId, imageId, reconnect = DEFAULT_RECONNECT, onReconnect = null }) {
    this._openCall = openCall;
    this._reconnect = { ...DEFAULT_RECONNECT, ...reconnect };
    this._onReconnect = onReconnect;
    this._call = null;
    this._cancelled = false;
    this._started = false;
    this.regionId = regionId;
    this.imageId = imageId;
    this.accounts = new Map();
    this.shareGroups = [];
    this.reconnects = 0;
  }

  get isPublic() {
    return this.shareGroups.includes(PUBLIC_GROUP);
  }

  _change(message, fields) {
    return {
      regionId: this.regionId,
      imageId: this.imageId,
      snapshot: false,
      resumed: false,
      added: [],
      removed: [],
      groupsAdded: [],
      groupsRemoved: [],
      ...fields,
      totalCount: this.accounts.size,
      readTime: toDate(message.readTime),
      get becamePublic() {
        return !this.snapshot && this.groupsAdded.includes(PUBLIC_GROUP);
      },
      get becamePrivate() {
        return this.groupsRemoved.includes(PUBLIC_GROUP);
      },
    };
  }

  _apply(message) {
    if (message.snapshot) return this._snapshot(message);
    const removed = message.removedAliyunIds.filter((id) => this.accounts.delete(id));
    const groupsRemoved = message.removedShareGroups.filter((g) => this.shareGroups.includes(g));
    this.shareGroups = this.shareGroups.filter((g) => !groupsRemoved.includes(g));
    const added = message.accounts.map(account);
    for (const a of added) this.accounts.set(a.aliyunId, a);
    const groupsAdded = message.shareGroups.map((g) => g.group).filter((g) => !this.shareGroups.includes(g));
    this.shareGroups.push(...groupsAdded);
    return this._change(message, { added, removed, groupsAdded, groupsRemoved });
  }

  _snapshot(message) {
    const accounts = new Map(message.accounts.map((a) => [a.aliyunId, account(a)]));
    const groups = [...new Set(message.shareGroups.map((g) => g.group))];
    if (!this._started) {
      this._started = true;
      this.accounts = accounts;
      this.shareGroups = groups;
      return this._change(message, { snapshot: true, added: [...accounts.values()], groupsAdded: groups });
    }
    // A new stream after a reconnect: what changed while disconnected.
    const added = [...accounts.values()].filter((a) => !this.accounts.has(a.aliyunId) || !sameAccount(this.accounts.get(a.aliyunId), a));
    const removed = [...this.accounts.keys()].filter((id) => !accounts.has(id));
    const groupsAdded = groups.filter((g) => !this.shareGroups.includes(g));
    const groupsRemoved = this.shareGroups.filter((g) => !groups.includes(g));
    this.accounts = accounts;
    this.shareGroups = groups;
    if (!added.length && !removed.length && !groupsAdded.length && !groupsRemoved.length) return null;
    return this._change(message, { resumed: true, added, removed, groupsAdded, groupsRemoved });
  }

  async *[Symbol.asyncIterator]() {
    let failures = 0;
    try {
      while (!this._cancelled) {
        this._call = this._openCall();
        let error;
        try {
          for await (const message of this._call) {
            failures = 0;
            const change = this._apply(message);
            if (change) yield change;
          }
          error = new ImageShareError({ code: grpc.status.UNAVAILABLE, details: 'the server ended the watch' });
        } catch (err) {
          if (this._cancelled) return;
          error = new ImageShareError(err);
        }
        failures += 1;
        const delay = reconnectDelayMs(error, failures, this._reconnect);
        if (delay === null) throw error;
        if (this._onReconnect) this._onReconnect(failures, error, delay);
        await sleep(delay);
        this.reconnects += 1;
      }
    } finally {
      this.cancel();
    }
  }

  cancel() {
    this._cancelled = true;
    if (this._call) this._call.cancel();
  }
}

class ImageShareClient {
  /**
   * @param {string} target host:port
   * @param {object} [opts]
   * @param {grpc.ChannelCredentials} [opts.credentials] TLS; insecure when absent
   * @param {number} [opts.timeoutMs] default deadline of a listing (10 s)
   * @param {object} [opts.serviceConfig] gRPC service config (retryPolicy for UNAVAILABLE)
   */
  constructor(target, { credentials, timeoutMs = DEFAULT_TIMEOUT_MS, serviceConfig = DEFAULT_SERVICE_CONFIG, options = {} } = {}) {
    const Service = loadPackage().ImageShareService;
    this._client = new Service(target, credentials || grpc.credentials.createInsecure(), {
      'grpc.keepalive_time_ms': 30_000,
      'grpc.keepalive_timeout_ms': 10_000,
      'grpc.max_receive_message_length': 4 * 1024 * 1024,
      'grpc.service_config': JSON.stringify(serviceConfig),
      ...options,
    });
    this.timeoutMs = timeoutMs;
  }

  /**
   * Accounts the image is shared with, as a lazy ShareListing.
   * `metadata` (an object of strings, or a grpc.Metadata) is sent with the call, e.g. a W3C
   * `traceparent` so the server's spans join the caller's trace (OpenTelemetry's grpc-js
   * instrumentation adds it by itself).
   */
  listShares(regionId, imageId, { ownerAccount = '', pageSize = 0, bypassCache = false, timeoutMs, metadata } = {}) {
    const request = { regionId, imageId, ownerAccount, pageSize, bypassCache };
    const deadline = new Date(Date.now() + (timeoutMs ?? this.timeoutMs));
    const md = toMetadata(metadata);
    return new ShareListing(() => this._client.ListImageShares(request, md, { deadline }));
  }

  /**
   * Whether aliyunId (digits) may launch the image: CheckImageShare, one small call answered
   * from the server's cache when it has the list. Resolves to `{ shared, via, sharedTime,
   * totalCount, cacheStatus, readTime, upstreamRequestIds }`; `via` is 'SHARE_VIA_ACCOUNT'
   * (listed, with its sharedTime), 'SHARE_VIA_PUBLIC' or 'SHARE_VIA_UNSPECIFIED' (not shared).
   */
  check(regionId, imageId, aliyunId, { ownerAccount = '', bypassCache = false, timeoutMs } = {}) {
    const request = { regionId, imageId, ownerAccount, aliyunId, bypassCache };
    const deadline = new Date(Date.now() + (timeoutMs ?? this.timeoutMs));
    return new Promise((resolve, reject) => {
      this._client.CheckImageShare(request, { deadline }, (err, response) => {
        if (err) {
          reject(new ImageShareError(err));
          return;
        }
        resolve({
          shared: response.shared,
          via: response.via,
          sharedTime: toDate(response.sharedTime),
          totalCount: response.totalCount,
          cacheStatus: response.cacheStatus,
          readTime: toDate(response.readTime),
          upstreamRequestIds: response.upstreamRequestIds,
        });
      });
    });
  }

  /** True when accountId may use the image: listed, or the image is public (group "all"). */
  async isSharedWith(regionId, imageId, accountId, opts = {}) {
    return (await this.check(regionId, imageId, accountId, opts)).shared;
  }

  /**
   * The image's share list and every change to it, as a ShareWatch (no deadline; it
   * reconnects after UNAVAILABLE). `reconnect`: { maxAttempts, initialBackoffMs,
   * maxBackoffMs, multiplier }; `onReconnect(failures, error, delayMs)` is told of each.
   */
  watch(regionId, imageId, { ownerAccount = '', reconnect, onReconnect } = {}) {
    const request = { regionId, imageId, ownerAccount };
    return new ShareWatch(() => this._client.WatchImageShares(request), {
      regionId,
      imageId,
      reconnect,
      onReconnect,
    });
  }

  close() {
    this._client.close();
  }
}

module.exports = {
  ImageShareClient,
  ImageShareError,
  ShareListing,
  ShareWatch,
  DEFAULT_SERVICE_CONFIG,
  DEFAULT_RECONNECT,
  PROTO_ROOT,
};
