'use strict';
// Runs against a live server: IMAGESHARE_TARGET=host:port node --test test/
// tests/test_node_client.py starts a server (polling watched images every second) in front of
// an emulator whose admin API is at IMAGESHARE_EMULATOR_URL, and runs this.
const test = require('node:test');
const assert = require('node:assert/strict');
const grpc = require('@grpc/grpc-js');
const { ImageShareClient, ImageShareError, ShareWatch } = require('../client');

const target = process.env.IMAGESHARE_TARGET;
if (!target) throw new Error('set IMAGESHARE_TARGET to a running imageshare server');
const emulator = process.env.IMAGESHARE_EMULATOR_URL;
const REGION = 'cn-hangzhou';

/** An operation of the emulator's admin API (upsert_image, modify_share...). */
async function admin(op, body) {
  if (!emulator) throw new Error('set IMAGESHARE_EMULATOR_URL to the emulator behind the server');
  const response = await fetch(`${emulator}/_emulator/${op}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body),
  });
  const payload = await response.json();
  if (!payload.ok) throw new Error(`${op}: ${payload.error}`);
  return payload.result;
}

test('lists every account of a large share list exactly once, in chunks', async (t) => {
  const client = new ImageShareClient(target);
  t.after(() => client.close());
  const listing = client.listShares(REGION, 'm-demo0000001', { pageSize: 7 });
  const { accounts, metadata } = await listing.collect();
  assert.ok(accounts.length >= 120, `only ${accounts.length} accounts`);
  assert.equal(accounts.length, metadata.totalCount);
  assert.equal(new Set(accounts.map((a) => a.aliyunId)).size, accounts.length);
  assert.ok(accounts.every((a) => typeof a.aliyunId === 'string' && a.aliyunId.length > 0));
  assert.equal(metadata.regionId, REGION);
  assert.equal(metadata.imageId, 'm-demo0000001');
  assert.equal(metadata.isPublic, false);
});

test('a public image is shared with everyone', async (t) => {
  const client = new ImageShareClient(target);
  t.after(() => client.close());
  const listing = client.listShares(REGION, 'm-demo0000002');
  const meta = await listing.start();
  listing.cancel();
  assert.deepEqual(meta.shareGroups, ['all']);
  assert.equal(await client.isSharedWith(REGION, 'm-demo0000002', '999999'), true);
});

test('an image shared with nobody yields one empty message', async (t) => {
  const client = new ImageShareClient(target);
  t.after(() => client.close());
  const { accounts, metadata } = await client.listShares(REGION, 'm-demo0000003').collect();
  assert.deepEqual(accounts, []);
  assert.equal(metadata.totalCount, 0);
  assert.equal(await client.isSharedWith(REGION, 'm-demo0000003', '123'), false);
});

test('isSharedWith finds a listed account', async (t) => {
  const client = new ImageShareClient(target);
  t.after(() => client.close());
  const { accounts } = await client.listShares(REGION, 'm-demo0000001').collect();
  const last = accounts[accounts.length - 1].aliyunId;
  assert.equal(await client.isSharedWith(REGION, 'm-demo0000001', last), true);
  assert.equal(await client.isSharedWith(REGION, 'm-demo0000001', '999'), false);
});

test('check says whether and how an account may launch an image', async (t) => {
  const client = new ImageShareClient(target);
  t.after(() => client.close());
  const { accounts } = await client.listShares(REGION, 'm-demo0000001').collect();
  const listed = await client.check(REGION, 'm-demo0000001', accounts[3].aliyunId);
  assert.equal(listed.shared, true);
  assert.equal(listed.via, 'SHARE_VIA_ACCOUNT');
  assert.equal(listed.sharedTime.getTime(), accounts[3].sharedTime.getTime());
  assert.equal(listed.totalCount, accounts.length);
  const pub = await client.check(REGION, 'm-demo0000002', '999');
  assert.deepEqual([pub.shared, pub.via, pub.sharedTime], [true, 'SHARE_VIA_PUBLIC', null]);
  const no = await client.check(REGION, 'm-demo0000003', '999');
  assert.deepEqual([no.shared, no.via], [false, 'SHARE_VIA_UNSPECIFIED']);
  await assert.rejects(client.check(REGION, 'm-demo0000001', 'not-an-account'), (err) => {
    assert.equal(err.codeName, 'INVALID_ARGUMENT');
    assert.deepEqual(err.fieldViolations.map((v) => v.field), ['aliyun_id']);
    return true;
  });
});

test('watch yields the list, then each change as the server polls', async (t) => {
  const client = new ImageShareClient(target);
  t.after(() => client.close());
  const imageId = `m-node${Date.now()}`;
  await admin('upsert_image', { image: { region_id: REGION, image_id: imageId, accounts: [{ aliyun_id: '100' }] } });
  const watch = client.watch(REGION, imageId);
  const changes = watch[Symbol.asyncIterator]();
  const first = (await changes.next()).value;
  assert.equal(first.snapshot, true);
  assert.deepEqual(first.added.map((a) => a.aliyunId), ['100']);
  await admin('modify_share', { region_id: REGION, image_id: imageId, add_accounts: ['200'], add_groups: ['all'] });
  const change = (await changes.next()).value;
  assert.equal(change.snapshot, false);
  assert.deepEqual(change.added.map((a) => a.aliyunId), ['200']);
  assert.ok(change.added[0].sharedTime instanceof Date);
  assert.deepEqual(change.groupsAdded, ['all']);
  assert.equal(change.becamePublic, true);
  assert.equal(change.totalCount, 2);
  assert.equal(watch.isPublic, true);
  await admin('modify_share', { region_id: REGION, image_id: imageId, remove_accounts: ['100'] });
  const removal = (await changes.next()).value;
  assert.deepEqual(removal.removed, ['100']);
  assert.deepEqual([...watch.accounts.keys()], ['200']);
  await changes.return();
  await admin('delete_image', { region_id: REGION, image_id: imageId });
});

test('a watch of an image that does not exist rejects with NOT_FOUND', async (t) => {
  const client = new ImageShareClient(target);
  t.after(() => client.close());
  const changes = client.watch(REGION, 'm-doesnotexist0')[Symbol.asyncIterator]();
  await assert.rejects(changes.next(), (err) => {
    assert.ok(err instanceof ImageShareError);
    assert.equal(err.codeName, 'NOT_FOUND');
    return true;
  });
});

test('errors carry the gRPC status name', async (t) => {
  const client = new ImageShareClient(target);
  t.after(() => client.close());
  await assert.rejects(client.listShares(REGION, 'm-doesnotexist0').collect(), (err) => {
    assert.ok(err instanceof ImageShareError);
    assert.equal(err.codeName, 'NOT_FOUND');
    assert.ok(err.reason.length > 0, 'ErrorInfo.reason decoded');
    return true;
  });
  await assert.rejects(client.listShares('Not A Region', 'm-demo0000001').collect(), (err) => {
    assert.equal(err.codeName, 'INVALID_ARGUMENT');
    assert.ok(err.fieldViolations.some((v) => v.field === 'region_id'), JSON.stringify(err.fieldViolations));
    return true;
  });
});

test('the deadline bounds the call', async (t) => {
  const client = new ImageShareClient(target, { timeoutMs: 1 });
  t.after(() => client.close());
  await assert.rejects(client.listShares(REGION, 'm-demo0000001', { bypassCache: true }).collect(), (err) => {
    assert.equal(err.codeName, 'DEADLINE_EXCEEDED');
    return true;
  });
});

function message(ids, { snapshot = false, removed = [], groups = [] } = {}) {
  return {
    snapshot,
    accounts: ids.map((aliyunId) => ({ aliyunId, sharedTime: null })),
    removedAliyunIds: removed,
    shareGroups: groups.map((group) => ({ group })),
    removedShareGroups: [],
    totalCount: 0,
    readTime: null,
  };
}

/** A stand-in for a grpc-js call: its messages, then an error (or nothing more). */
function scriptedCall(messages, error) {
  return {
    cancelled: false,
    cancel() {
      this.cancelled = true;
    },
    async *[Symbol.asyncIterator]() {
      yield* messages;
      if (error) throw error;
      await new Promise(() => {});
    },
  };
}

test('a watch reconnects after UNAVAILABLE and reports what changed meanwhile', async () => {
  const calls = [
    scriptedCall([message(['1', '2'], { snapshot: true }), message(['3'])], { code: grpc.status.UNAVAILABLE, details: 'drain' }),
    scriptedCall([message(['1', '3', '4'], { snapshot: true, groups: ['all'] })]),
  ];
  let opened = 0;
  const delays = [];
  const watch = new ShareWatch(() => calls[opened++], {
    regionId: REGION,
    imageId: 'm-test',
    reconnect: { initialBackoffMs: 1, maxBackoffMs: 5 },
    onReconnect: (failures, error, delay) => delays.push([failures, error.codeName, delay <= 5]),
  });
  const changes = watch[Symbol.asyncIterator]();
  assert.equal((await changes.next()).value.snapshot, true);
  assert.deepEqual((await changes.next()).value.added.map((a) => a.aliyunId), ['3']);
  const resumed = (await changes.next()).value;
  assert.equal(resumed.resumed, true);
  assert.deepEqual(resumed.added.map((a) => a.aliyunId), ['4']);
  assert.deepEqual(resumed.removed, ['2']);
  assert.equal(resumed.becamePublic, true);
  assert.deepEqual(delays, [[1, 'UNAVAILABLE', true]]);
  assert.equal(watch.reconnects, 1);
  await changes.return();
  assert.equal(calls[1].cancelled, true);
});
