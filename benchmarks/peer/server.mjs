// @supabase/stripe-sync-engine behind one Fastify route, the way its README wires it: the
// peer benchmarks/receiver_bench.py measures the receiver against. Started by benchmarks/peer.py.
//
//   DATABASE_URL=... STRIPE_WEBHOOK_SECRET=whsec_... PORT=8300 node server.mjs
//
// There is no Stripe API in the benchmark, so the engine must store every event from its
// payload. For invoice.* events (stripeSync.js processEvent) it calls Stripe only when
// revalidateObjectsViaStripeApi lists "invoice", when backfillRelatedEntities looks the
// customer and subscription up, or when autoExpandLists meets `lines.has_more`: all three off.
import Fastify from 'fastify';
import Stripe from 'stripe';
import { StripeSync } from '@supabase/stripe-sync-engine';

const { DATABASE_URL, STRIPE_WEBHOOK_SECRET } = process.env;
const PORT = Number(process.env.PORT);
const HOST = process.env.HOST || '127.0.0.1';
if (!DATABASE_URL || !STRIPE_WEBHOOK_SECRET || !PORT) {
  console.error('DATABASE_URL, STRIPE_WEBHOOK_SECRET and PORT are required');
  process.exit(2);
}

const stripeSync = new StripeSync({
  poolConfig: { connectionString: DATABASE_URL, max: 10 },
  stripeSecretKey: 'sk_test_peer_has_no_stripe_api',
  stripeWebhookSecret: STRIPE_WEBHOOK_SECRET,
  revalidateObjectsViaStripeApi: [],
  backfillRelatedEntities: false,
  autoExpandLists: false,
});
// Should an event still reach for the API, it fails at once on a closed local port (and the
// delivery gets a 500) instead of waiting on a DNS lookup that cannot succeed here.
stripeSync.stripe = new Stripe('sk_test_peer_has_no_stripe_api', {
  host: '127.0.0.1', port: 9, protocol: 'http', maxNetworkRetries: 0,
});

const app = Fastify({ logger: false });
// The signature covers the exact bytes Stripe sent: every body stays a Buffer, unparsed.
app.removeAllContentTypeParsers();
app.addContentTypeParser('*', { parseAs: 'buffer' }, (_request, body, done) => done(null, body));

app.get('/healthz', async () => ({ ok: true }));

app.post('/webhooks/stripe', async (request, reply) => {
  try {
    await stripeSync.processWebhook(request.body, request.headers['stripe-signature']);
  } catch (err) {
    if (err instanceof Stripe.errors.StripeSignatureVerificationError) {
      return reply.code(400).send({ error: err.message });
    }
    // Anything else (the database, an unhandled type) is the endpoint's failure: Stripe retries.
    request.log.error(err);
    console.error(err);
    return reply.code(500).send({ error: 'not stored' });
  }
  return reply.code(200).send({ received: true });
});

async function stop() {
  await app.close();
  await stripeSync.close();
  process.exit(0);
}
process.once('SIGTERM', stop);
process.once('SIGINT', stop);

await app.listen({ host: HOST, port: PORT });
console.log(`stripe-sync-engine peer on http://${HOST}:${PORT}/webhooks/stripe`);
