'use strict';
// Runs against a live server: IMAGESHARE_TARGET=host:port node --test test/
// tests/test_node_client.py starts `imageshare-server --emulator` and runs this.
const test = require('node:test');
const assert = require('node:assert/strict');
const { ImageShareClient, ImageShareError } = require('../client');

const target = process.env.IMAGESHARE_TARGET;
if (!target) throw new Error('set IMAGESHARE_TARGET to a running imageshare server');
const REGION = 'cn-hangzhou';

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
  assert.equal(await client.isSharedWith(REGION, 'm-demo0000001', 'not-an-account'), false);
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
