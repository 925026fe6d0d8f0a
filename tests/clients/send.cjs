// Sends one call of each kind with Segment's official Node library, then flushes.
//
// Usage: node send.cjs HOST WRITE_KEY RUN_ID
// Message ids are "<RUN_ID>-<call>"; the test that runs this checks each row.
const { Analytics } = require('@segment/analytics-node')

const [host, writeKey, run] = process.argv.slice(2)
const analytics = new Analytics({ writeKey, host, maxRetries: 2, flushInterval: 100 })
const failures = []
analytics.on('error', (error) => failures.push(error))

analytics.track({ userId: 'user-node', event: 'Order Completed', properties: { revenue: 7.25, library: 'node' }, messageId: `${run}-track` })
analytics.identify({ userId: 'user-node', traits: { email: 'node@example.com', plan: 'team' }, messageId: `${run}-identify` })
analytics.page({ userId: 'user-node', category: 'Docs', name: 'Install', properties: { path: '/install' }, messageId: `${run}-page` })
analytics.screen({ userId: 'user-node', name: 'Home', properties: { seconds: 4 }, messageId: `${run}-screen` })
analytics.group({ userId: 'user-node', groupId: 'group-node', traits: { name: 'Initech' }, messageId: `${run}-group` })
analytics.alias({ previousId: 'anon-node', userId: 'user-node', messageId: `${run}-alias` })

analytics.closeAndFlush({ timeout: 20000 }).then(() => {
  if (failures.length > 0) {
    console.error('the library reported errors:', failures)
    process.exit(1)
  }
})
