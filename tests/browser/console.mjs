// Drives the idgate web console in a real Chromium (Debian's /usr/bin/chromium
// through playwright-core). Started by tests/tests/e2e/console.rs against a
// running gateway, with everything it needs in the environment:
//
//   IDGATE_CONSOLE_URL        https://127.0.0.1:PORT of the admin listener
//   IDGATE_OPERATOR / IDGATE_OPERATOR_PASSWORD   an operator account
//   IDGATE_VIEWER / IDGATE_VIEWER_PASSWORD       a viewer account
//   IDGATE_SITE               a site with several devices
//   IDGATE_DEVICE             the device to revoke (active, at that site)
//   IDGATE_DEVICE_LABEL       its label
//   IDGATE_OTHER_DEVICE       another active device (the viewer's test)
//   IDGATE_XSS_DEVICE         a device whose owner and site hold markup
//   IDGATE_XSS_OWNER          that owner, verbatim
//   IDGATE_BATCH              a batch id
//   IDGATE_SCREENSHOTS        where the PNGs go
//   CHROMIUM                  the browser (default /usr/bin/chromium)
//
// Prints one line per step; exits 1 with the failed step's message.

import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { chromium } from "playwright-core";

const env = (name, fallback) => {
  const value = process.env[name] ?? fallback;
  if (value === undefined) throw new Error(`environment variable ${name} is not set`);
  return value;
};

const base = env("IDGATE_CONSOLE_URL");
const shots = env("IDGATE_SCREENSHOTS");
const device = env("IDGATE_DEVICE");
const label = env("IDGATE_DEVICE_LABEL");
const site = env("IDGATE_SITE");
const other = env("IDGATE_OTHER_DEVICE");
const xssDevice = env("IDGATE_XSS_DEVICE");
const xssOwner = env("IDGATE_XSS_OWNER");
const batch = env("IDGATE_BATCH");
mkdirSync(shots, { recursive: true });

function check(condition, message) {
  if (!condition) throw new Error(message);
}

let step = "start";
const say = (message) => console.log(`console test: ${message}`);

async function shot(page, name) {
  await page.screenshot({ path: join(shots, `${name}.png`), fullPage: true });
}

async function logIn(context, user, password) {
  const page = await context.newPage();
  // A dialog would mean a script ran: nothing on these pages opens one.
  page.on("dialog", async (dialog) => {
    console.error(`console test: FAILED: a script opened a dialog: ${dialog.message()}`);
    process.exit(1);
  });
  await page.goto(`${base}/`);
  check(new URL(page.url()).pathname === "/login", `not redirected to the login page: ${page.url()}`);
  await page.getByLabel("User name").fill(user);
  await page.getByLabel("Password").fill(password);
  return page;
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
  headless: true,
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});

try {
  // The admin listener's certificate is signed by the gateway's own root.
  const desktop = { ignoreHTTPSErrors: true, viewport: { width: 1280, height: 800 } };

  step = "wrong password";
  const operator = await browser.newContext(desktop);
  let page = await logIn(operator, env("IDGATE_OPERATOR"), "not the password");
  await page.getByRole("button", { name: "Log in" }).click();
  await page.getByRole("alert").waitFor();
  const refusal = await page.getByRole("alert").innerText();
  check(refusal.includes("Wrong user name or password"),
    `a wrong password does not say so (${page.url()}: ${refusal})`);
  say("a wrong password is refused with a message");

  step = "log in as operator";
  await page.getByLabel("User name").fill(env("IDGATE_OPERATOR"));
  await page.getByLabel("Password").fill(env("IDGATE_OPERATOR_PASSWORD"));
  await shot(page, "login");
  await page.getByRole("button", { name: "Log in" }).click();
  await page.getByRole("heading", { name: "Fleet overview" }).waitFor();
  await shot(page, "overview");
  say("logged in as operator, overview shown");

  step = "search a site";
  await page.getByLabel("Find a device by id, label, site, owner or model").fill(site);
  await page.getByRole("button", { name: "Search" }).click();
  await page.waitForURL((url) => url.pathname === "/devices");
  const row = page.getByRole("row").filter({ hasText: device });
  await row.waitFor();
  check((await page.getByRole("row").count()) >= 3, "the site search lists fewer than two devices");
  await shot(page, "devices");
  say(`searching "${site}" lists ${device}`);

  step = "open the device";
  await row.getByRole("link", { name: device }).click();
  await page.getByRole("heading", { name: `Device ${device}` }).waitFor();
  check((await page.locator("h1 .status").innerText()) === "active", "the device is not shown active");
  check((await page.locator("main").innerText()).includes(label), "the device page does not show its label");
  await shot(page, "device");
  say(`device page of ${device} shows it active`);

  step = "revoke with a reason";
  await page.getByRole("link", { name: "Revoke…" }).click();
  await page.getByRole("heading", { name: `Revoke device ${device}` }).waitFor();
  const warning = await page.locator(".notice.warn").innerText();
  check(warning.includes("cut off within a second") && warning.includes("cannot renew") && warning.includes("registered again"),
    `the confirmation does not say what will happen: ${warning}`);
  // The reason is required: the browser refuses to submit without one.
  await page.getByLabel("Lost").check();
  await shot(page, "revoke");
  await page.getByRole("button", { name: `Revoke ${device}` }).click();
  await page.getByRole("status").waitFor();
  check((await page.locator("h1 .status").innerText()) === "revoked", "the device is not shown revoked");
  check((await page.locator("table").first().innerText()).includes("keyCompromise"),
    "the certificate is not shown revoked for keyCompromise");
  await shot(page, "device-revoked");
  say(`${device} revoked for "lost" and shown revoked`);

  step = "label search goes straight to the device";
  await page.goto(`${base}/devices?q=${encodeURIComponent(label.toLowerCase())}`);
  check(new URL(page.url()).pathname === `/devices/${device}`, `a label search did not open the device: ${page.url()}`);
  say("a search by the label on the case opens the device");

  step = "audit log";
  await page.getByRole("link", { name: "Audit log" }).click();
  await page.getByRole("heading", { name: "Audit log" }).waitFor();
  const revokeEntry = page.getByRole("row").filter({ hasText: "device.revoke" }).filter({ hasText: device });
  await revokeEntry.waitFor();
  check((await revokeEntry.innerText()).includes(`user:${env("IDGATE_OPERATOR")}`),
    "the audit log does not name the operator");
  await shot(page, "audit");
  say("the audit log names the operator");

  step = "batches";
  await page.getByRole("link", { name: "Batches", exact: true }).click();
  await page.getByRole("link", { name: batch }).click();
  await page.getByRole("heading", { name: `Batch ${batch}` }).waitFor();
  await shot(page, "batch");
  say(`batch ${batch} shown`);

  step = "markup in device fields is text";
  await page.goto(`${base}/devices/${xssDevice}`);
  await page.getByRole("heading", { name: `Device ${xssDevice}` }).waitFor();
  const owner = await page.locator("dt:text-is('Owner') + dd").innerText();
  check(owner === xssOwner, `the owner is not shown verbatim: ${JSON.stringify(owner)}`);
  check((await page.locator("main script, main img, main iframe").count()) === 0,
    "markup from a device field became an element");
  await shot(page, "xss-device");
  // Only that device matches, so the search opens it.
  await page.goto(`${base}/devices?q=${encodeURIComponent("<script>")}`);
  check(new URL(page.url()).pathname === `/devices/${xssDevice}`, `a search for markup went to ${page.url()}`);
  await page.goto(`${base}/devices?q=${encodeURIComponent("<script>alert('q')</script>")}`);
  await page.getByRole("heading").filter({ hasText: "<script>alert('q')</script>" }).waitFor();
  check((await page.locator("main script").count()) === 0, "a search for markup became an element");
  await shot(page, "xss-search");
  say("markup in owner and site fields shows as text");

  step = "edit the site";
  // The device whose owner holds markup: the prefilled owner must go back
  // unchanged while only the site changes.
  await page.goto(`${base}/devices/${xssDevice}`);
  await page.getByRole("link", { name: "Edit owner, site, label" }).click();
  await page.getByRole("heading", { name: `Edit device ${xssDevice}` }).waitFor();
  check((await page.getByLabel("Owner (email address)").inputValue()) === xssOwner,
    "the edit form does not show the owner as stored");
  const newSite = "Hall 7, room 12";
  await page.getByLabel("Site").fill(newSite);
  await shot(page, "edit");
  await page.getByRole("button", { name: "Save changes" }).click();
  await page.getByRole("status").waitFor();
  check(new URL(page.url()).pathname === `/devices/${xssDevice}`, `saving did not return to the device: ${page.url()}`);
  check((await page.locator("dt:text-is('Site') + dd").innerText()) === newSite, "the device page does not show the new site");
  check((await page.locator("dt:text-is('Owner') + dd").innerText()) === xssOwner, "saving the site changed the owner");
  const update = page.getByRole("row").filter({ hasText: "device.update" });
  check((await update.innerText()).includes(`user:${env("IDGATE_OPERATOR")}`),
    "the device's audit trail does not name the operator for the edit");
  say(`the site of ${xssDevice} edited through the form and shown on its page`);

  step = "phone screen";
  const phone = await browser.newContext({
    ignoreHTTPSErrors: true,
    viewport: { width: 390, height: 844 },
    deviceScaleFactor: 2,
    isMobile: true,
    hasTouch: true,
    storageState: await operator.storageState(),
  });
  const small = await phone.newPage();
  await small.goto(`${base}/`);
  await small.getByRole("heading", { name: "Fleet overview" }).waitFor();
  const overflow = await small.evaluate(() => document.documentElement.scrollWidth - 390);
  check(overflow <= 0, `the overview is ${overflow}px wider than a phone screen`);
  await shot(small, "phone-overview");
  await small.goto(`${base}/devices/${other}`);
  await small.getByRole("heading", { name: `Device ${other}` }).waitFor();
  const deviceOverflow = await small.evaluate(() => document.documentElement.scrollWidth - 390);
  check(deviceOverflow <= 0, `the device page is ${deviceOverflow}px wider than a phone screen`);
  await shot(small, "phone-device");
  await small.goto(`${base}/devices/${other}/edit`);
  await small.getByRole("heading", { name: `Edit device ${other}` }).waitFor();
  const editOverflow = await small.evaluate(() => document.documentElement.scrollWidth - 390);
  check(editOverflow <= 0, `the edit form is ${editOverflow}px wider than a phone screen`);
  await shot(small, "phone-edit");
  await phone.close();
  say("overview, device page and edit form fit a phone screen");

  step = "log out";
  await page.getByRole("button", { name: "Log out" }).click();
  await page.waitForURL((url) => url.pathname === "/login");
  await page.goto(`${base}/devices`);
  check(new URL(page.url()).pathname === "/login", "the console is still open after logging out");
  say("logged out");
  await operator.close();

  step = "viewer";
  const viewer = await browser.newContext(desktop);
  page = await logIn(viewer, env("IDGATE_VIEWER"), env("IDGATE_VIEWER_PASSWORD"));
  await page.getByRole("button", { name: "Log in" }).click();
  await page.getByRole("heading", { name: "Fleet overview" }).waitFor();
  await page.goto(`${base}/devices/${other}`);
  await page.getByRole("heading", { name: `Device ${other}` }).waitFor();
  check((await page.getByRole("link", { name: /revoke/i }).count()) === 0, "a viewer sees a revoke button");
  check((await page.getByRole("button", { name: "Suspend" }).count()) === 0, "a viewer sees a suspend button");
  check((await page.getByRole("link", { name: /edit/i }).count()) === 0, "a viewer sees an edit button");
  await shot(page, "viewer-device");
  const form = await page.request.get(`${base}/devices/${other}/revoke`);
  check(form.status() === 403, `a viewer opens the revoke form (${form.status()})`);
  // Even with the session's CSRF token, the server refuses the viewer.
  const csrf = await page.locator("input[name=csrf]").first().inputValue();
  const posted = await page.request.post(`${base}/devices/${other}/revoke`, {
    form: { csrf, reason: "lost" },
    maxRedirects: 0,
  });
  check(posted.status() === 403, `a viewer's revoke was not refused (${posted.status()})`);
  // And nobody may post without the CSRF token.
  const forged = await page.request.post(`${base}/devices/${other}/suspend`, { form: {}, maxRedirects: 0 });
  check(forged.status() === 403, `a post without the CSRF token was not refused (${forged.status()})`);
  await page.reload();
  check((await page.locator("h1 .status").innerText()) === "active", "the viewer's attempt changed the device");
  say("a viewer sees no revoke button and the server refuses its revoke");
  await viewer.close();

  say("all steps passed");
} catch (error) {
  console.error(`console test: FAILED at step "${step}": ${error.message}`);
  await browser.close();
  process.exit(1);
}
await browser.close();
