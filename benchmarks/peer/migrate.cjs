// The engine's migrations into DATABASE_URL's "stripe" schema. CommonJS on purpose: the
// package's ESM build resolves its migrations with __dirname, which ESM lacks, and
// runMigrations logs errors instead of throwing, so a failure is told by the logger here.
const { runMigrations } = require('@supabase/stripe-sync-engine');
const { Client } = require('pg');

async function main() {
  const failures = [];
  const logger = {
    info() {},
    error(err, message) { failures.push(`${message} ${err && err.stack ? err.stack : err}`); },
  };
  await runMigrations({ databaseUrl: process.env.DATABASE_URL, schema: 'stripe', logger });
  if (failures.length) throw new Error(failures.join('\n'));
  const client = new Client({ connectionString: process.env.DATABASE_URL });
  await client.connect();
  try {
    const { rows } = await client.query("select to_regclass('stripe.invoices') as invoices");
    if (!rows[0].invoices) throw new Error('migrations ran but stripe.invoices is missing');
  } finally {
    await client.end();
  }
}

main().catch((err) => {
  console.error(err.message || err);
  process.exit(1);
});
