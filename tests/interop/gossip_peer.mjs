// A js-libp2p gossipsub peer with default settings (StrictSign), for
// tests/interop/test_js_gossipsub.py. Usage: node gossip_peer.mjs ADDR TOPIC [KEY_HEX]
// It dials ADDR, subscribes to TOPIC and prints one JSON line per event; each line
// on stdin is a command: {"publish": topic, "data": base64} or {"stop": true}.
// KEY_HEX: the 32-byte Ed25519 seed of its key (so the test can sign as it).
import './polyfill.mjs'
import { createLibp2p } from 'libp2p'
import { gossipsub } from '@chainsafe/libp2p-gossipsub'
import { noise } from '@chainsafe/libp2p-noise'
import { yamux } from '@chainsafe/libp2p-yamux'
import { tcp } from '@libp2p/tcp'
import { identify } from '@libp2p/identify'
import { ping } from '@libp2p/ping'
import { generateKeyPairFromSeed } from '@libp2p/crypto/keys'
import { multiaddr } from '@multiformats/multiaddr'
import readline from 'node:readline'

const [addr, topic, keyHex] = process.argv.slice(2)
const out = (o) => process.stdout.write(JSON.stringify(o) + '\n')
const privateKey = keyHex
  ? await generateKeyPairFromSeed('Ed25519', Buffer.from(keyHex, 'hex'))
  : undefined
const node = await createLibp2p({
  privateKey,
  addresses: { listen: ['/ip4/127.0.0.1/tcp/0'] },
  transports: [tcp()],
  connectionEncrypters: [noise()],
  streamMuxers: [yamux()],
  services: { identify: identify(), ping: ping(), pubsub: gossipsub() },
})
node.services.pubsub.addEventListener('message', (evt) => {
  const m = evt.detail
  out({ event: 'message', topic: m.topic, from: m.from?.toString(), type: m.type })
})
node.services.pubsub.addEventListener('subscription-change', (evt) => {
  out({
    event: 'subscription',
    peer: evt.detail.peerId.toString(),
    topics: evt.detail.subscriptions.filter((s) => s.subscribe).map((s) => s.topic),
  })
})
node.services.pubsub.subscribe(topic)
await node.dial(multiaddr(addr))
out({ event: 'ready', peer: node.peerId.toString() })
for await (const line of readline.createInterface({ input: process.stdin })) {
  const cmd = JSON.parse(line)
  if (cmd.stop) break
  try {
    const sent = await node.services.pubsub.publish(cmd.publish, Buffer.from(cmd.data, 'base64'))
    out({ event: 'published', recipients: sent.recipients.length })
  } catch (err) {
    out({ event: 'publish_failed', error: String(err) })
  }
}
await node.stop()
process.exit(0)
