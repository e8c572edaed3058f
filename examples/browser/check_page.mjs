// Drives the page in headless Chromium (puppeteer-core, the system's browser): opens URL, waits for
// the model, types each text, presses Run, and reads what the page shows. For
// tests/test_browser_page.py, and a quick check of a served export by hand:
//
//   node check_page.mjs http://127.0.0.1:8000/ "first text" "second text"   ->   one JSON object on stdout
//
// REPLY: {loadMs, offOrigin: [URLs the page asked for outside its own server (blocked)],
//         console: [error messages], runs: [{text, shown: [what the page's table or number holds],
//         result: window.mpismoe.result}]}
// CHROMIUM (environment) names the browser (default /usr/bin/chromium). Exit status 1 when the page
// fails (its error is in the message), 2 on bad arguments.
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import path from "node:path";
import puppeteer from "puppeteer-core";

const [url, ...texts] = process.argv.slice(2);
if (!url || !texts.length) {
  console.error("usage: node check_page.mjs URL TEXT [TEXT...]");
  process.exit(2);
}
const TIMEOUT_MS = 120_000;
// no background traffic: this closed network refuses Chromium's own connections (and they are not the page's)
const FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

const profile = mkdtempSync(path.join(tmpdir(), "mpismoe-chromium-"));
const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [...FLAGS, `--user-data-dir=${profile}`],
});
const reply = { loadMs: null, offOrigin: [], console: [], runs: [] };
try {
  const page = await browser.newPage();
  const origin = new URL(url).origin;
  await page.setRequestInterception(true);
  page.on("request", (request) => {
    const target = request.url();
    if (target.startsWith("data:") || target.startsWith("blob:") || new URL(target).origin === origin) {
      request.continue();
    } else {
      reply.offOrigin.push(target);
      request.abort();
    }
  });
  page.on("console", (message) => {
    if (message.type() === "error") reply.console.push(message.text());
  });
  page.on("pageerror", (error) => reply.console.push(String(error)));

  await page.goto(url, { waitUntil: "load" });
  await page.waitForFunction(() => window.mpismoe && (window.mpismoe.ready || window.mpismoe.error), {
    timeout: TIMEOUT_MS,
  });
  const loaded = await page.evaluate(() => ({ error: window.mpismoe.error, loadMs: window.mpismoe.loadMs }));
  if (loaded.error) throw new Error(`the page failed to load the model: ${loaded.error}`);
  reply.loadMs = loaded.loadMs;

  for (const text of texts) {
    const before = await page.evaluate(() => window.mpismoe.runs);
    await page.$eval("#text", (box) => (box.value = ""));
    await page.type("#text", text);
    await page.click("#run");
    await page.waitForFunction((n) => window.mpismoe.runs > n || window.mpismoe.error, { timeout: TIMEOUT_MS }, before);
    const run = await page.evaluate(() => {
      const rows = [...document.querySelectorAll("#output [data-score]")].map((el) => ({
        ...el.dataset,
        text: el.innerText.replace(/\s+/g, " ").trim(),
      }));
      return { error: window.mpismoe.error, shown: rows, result: window.mpismoe.result };
    });
    if (run.error) throw new Error(`the page failed on ${JSON.stringify(text)}: ${run.error}`);
    reply.runs.push({ text, shown: run.shown, result: run.result });
  }
} catch (error) {
  console.error(`error: ${error.message}`);
  console.error(JSON.stringify({ offOrigin: reply.offOrigin, console: reply.console }));
  process.exitCode = 1;
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
if (!process.exitCode) process.stdout.write(JSON.stringify(reply));
