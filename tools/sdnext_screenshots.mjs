// Screenshots of the extension in a running SD.Next (docs/sdnext-*.png); composed by tools/sdnext_screenshots.py.
// Usage: NODE_PATH=<node_modules with playwright-core> node tools/sdnext_screenshots.mjs OUT_DIR [BASE_URL] [MODEL]
import { writeFileSync } from 'node:fs';
import { createRequire } from 'node:module';

const { chromium } = createRequire(import.meta.url)('playwright-core');  // found through NODE_PATH

const [out, base = 'http://127.0.0.1:7860/', model = 'Diffusers/tiny_sc_main'] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium', headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync'] });
const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
await page.goto(base, { waitUntil: 'domcontentloaded', timeout: 120000 });
await page.waitForSelector('#txt2img_prompt textarea', { timeout: 120000 });
await page.waitForTimeout(2000);
// the model dropdown: pick the pair
await page.locator('#setting_sd_model_checkpoint input').click();
await page.locator('#setting_sd_model_checkpoint li', { hasText: model }).first().click();
for (let i = 0; i < 240; i++) {  // SD.Next reports the option once the model is loaded
  const options = await (await page.request.get(base + 'sdapi/v1/options')).json();
  if (options.sd_model_checkpoint === model) break;
  await page.waitForTimeout(500);
}
for (let i = 0; i < 240; i++) {  // and the dropdown's busy overlay is gone
  if (!(await page.locator('#setting_sd_model_checkpoint').innerText()).includes('processing')) break;
  await page.waitForTimeout(500);
}
await page.waitForTimeout(500);
await page.locator('#setting_sd_model_checkpoint input').click();  // reopen: the chosen entry is ticked
await page.waitForTimeout(800);
await page.screenshot({ path: `${out}/list.png`, clip: { x: 0, y: 0, width: 1280, height: 170 } });
await page.keyboard.press('Escape');
// generate from the txt2img tab
await page.locator('#txt2img_prompt textarea').fill('a (red:1.2) fox in the snow, newest, best quality');
await page.locator('#txt2img_neg_prompt textarea').fill('blurry').catch(() => {});
for (const [id, v] of [['#txt2img_width', '512'], ['#txt2img_height', '512'], ['#txt2img_steps', '20']]) {
  const n = page.locator(`${id} input[type=number]`);
  if (await n.count()) { await n.fill(v); await n.press('Enter'); }
}
await page.locator('#txt2img_generate').click();
await page.waitForSelector('#txt2img_gallery img', { timeout: 300000 });
await page.waitForTimeout(2500);
await page.evaluate(() => window.scrollTo(0, 0));
await page.screenshot({ path: `${out}/full.png`, fullPage: true });
const boxes = await page.evaluate(() => {
  const r = (el) => { const b = el.getBoundingClientRect(); return { x: b.x + scrollX, y: b.y + scrollY, w: b.width, h: b.height }; };
  const infos = Array.from(document.querySelectorAll('#html_info_formatted_txt2img')).filter(e => e.offsetParent !== null);
  return { model: r(document.querySelector('#setting_sd_model_checkpoint')),
           gallery: r(document.querySelector('#txt2img_gallery')), info: r(infos[infos.length - 1]) };
});
writeFileSync(`${out}/boxes.json`, JSON.stringify(boxes));
await browser.close();
