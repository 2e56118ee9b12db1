'use strict';
// Node.js client for imageshare.v1.ImageShareService.
//
// The proto is loaded at run time from the repository's protos/ folder, so the client
// can never drift from the contract. Defaults mirror the Python client: a 10 s deadline
// per listing, keepalive for long-lived processes, and a gRPC service config whose
// retryPolicy retries UNAVAILABLE. gRPC commits a streaming attempt once response
// headers arrive, so a stream that has started is never replayed: a failure after the
// first message surfaces as an ImageShareError with `interrupted: true`.

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');
const protobuf = require('protobufjs');

const PROTO_ROOT = path.resolve(__dirname, '..', '..', 'protos');
const PROTO_FILE = 'imageshare/v1/image_share.proto';
const SERVICE = 'imageshare.v1.ImageShareService';
const DEFAULT_TIMEOUT_MS = 10_000;
const PUBLIC_GROUP = 'all';

const DEFAULT_SERVICE_CONFIG = {
  // Spreads calls over every address the target resolves to (a headless Service's pods);
  // with one address it is the same as pick_first.
  loadBalancingConfig: [{ round_robin: {} }],
  methodConfig: [
    {
      name: [{ service: SERVICE }],
      timeout: '10s',
      retryPolicy: {
        maxAttempts: 3,
        initialBackoff: '0.1s',
        maxBackoff: '1s',
        backoffMultiplier: 2,
        retryableStatusCodes: ['UNAVAILABLE'],
      },
    },
  ],
  retryThrottling: { maxTokens: 10, tokenRatio: 0.1 },
};

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

  /** True when accountId may use the image: listed, or the image is public (group "all"). */
  async isSharedWith(regionId, imageId, accountId, opts = {}) {
    const listing = this.listShares(regionId, imageId, { ...opts, pageSize: 100 });
    if ((await listing.start()).isPublic) {
      listing.cancel();
      return true;
    }
    for await (const account of listing) {
      if (account.aliyunId === accountId) return true;
    }
    return false;
  }

  close() {
    this._client.close();
  }
}

module.exports = { ImageShareClient, ImageShareError, ShareListing, DEFAULT_SERVICE_CONFIG, PROTO_ROOT };
