'use strict';
// Runnable example: node example.js [target] [region] [image]
// e.g. against `make run`: node example.js 127.0.0.1:50051 cn-hangzhou m-demo0000001
const { ImageShareClient, ImageShareError } = require('./client');

async function main() {
  const [target = process.env.IMAGESHARE_TARGET || '127.0.0.1:50051', region = 'cn-hangzhou', image = 'm-demo0000001'] =
    process.argv.slice(2);
  const client = new ImageShareClient(target);
  try {
    const listing = client.listShares(region, image);
    let count = 0;
    for await (const account of listing) {
      const when = account.sharedTime ? account.sharedTime.toISOString() : '-';
      console.log(`${account.aliyunId}\t${when}`);
      count += 1;
    }
    const { totalCount, shareGroups, cacheStatus } = listing.metadata;
    console.log(`# ${count} of ${totalCount} accounts; groups: [${shareGroups.join(', ')}]; cache: ${cacheStatus}`);
  } catch (err) {
    if (!(err instanceof ImageShareError)) throw err;
    console.error(`error: ${err.message}`);
    process.exitCode = 3;
  } finally {
    client.close();
  }
}

main();
