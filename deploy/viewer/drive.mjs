// Drive OHIF in Debian's Chromium (headless, playwright-core) the way a reader would, and report what the
// page shows; the tests in tests/viewer/ judge it. Nothing here knows what the SEG contains.
//
//   node drive.mjs [--no-sr] VIEWER_URL STUDY_UID OUT_DIR INSTANCE_NUMBER...
//
// Opens the study, double-clicks the SEG thumbnail and answers "Yes" to open it, opens the segmentation
// panel, then for each InstanceNumber scrolls with the arrow keys until the viewport overlay shows it and
// saves a screenshot of the viewport once it has stopped changing (and one of the whole page on the last).
// Then shows the SR's NumericValue items in OHIF's DICOM Tag Browser, double-clicks the SR thumbnail and
// opens the measurement panel (not with --no-sr).
// Writes OUT_DIR/report.json:
//   {segmentationPanel, slices: [{instance, overlay, png, clip}], srViewport, measurementPanel,
//    srWarnings, srTagBrowser, pageErrors, consoleErrors, failedRequests (status, method, URL; the first
//    20), timings}
import fs from 'node:fs';
import path from 'node:path';
import { chromium } from 'playwright-core';

const args = process.argv.slice(2);
const flags = new Set(args.filter(a => a.startsWith('--')));
const [viewerUrl, studyUid, outDir, ...instances] = args.filter(a => !a.startsWith('--'));
if (!viewerUrl || !studyUid || !outDir || [...flags].some(f => f !== '--no-sr')) {
  console.error('usage: node drive.mjs [--no-sr] VIEWER_URL STUDY_UID OUT_DIR INSTANCE_NUMBER...');
  process.exit(2);
}
const STEP_MS = Number(process.env.VIEWER_STEP_TIMEOUT_MS || 60000);
fs.mkdirSync(outDir, { recursive: true });
const report = { slices: [], pageErrors: [], consoleErrors: [], failedRequests: [], srWarnings: [], timings: {} };
const t0 = Date.now();
const mark = name => { report.timings[name] = (Date.now() - t0) / 1000; };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: [
    '--no-sandbox',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-default-apps',
    '--disable-sync',
    '--no-first-run',
    '--disable-dev-shm-usage',
    // WebGL without a GPU: SwiftShader, so that cornerstone renders as it does on a workstation.
    '--use-angle=swiftshader',
    '--enable-unsafe-swiftshader',
  ],
});

async function stableShot(page, locator, file) {
  // Screenshots of the viewport until two in a row are identical: rendering has settled.
  let previous = null;
  const deadline = Date.now() + STEP_MS;
  while (Date.now() < deadline) {
    const shot = await locator.screenshot({ animations: 'disabled' });
    if (previous && shot.equals(previous)) {
      fs.writeFileSync(file, shot);
      return;
    }
    previous = shot;
    await page.waitForTimeout(250);
  }
  throw new Error(`viewport did not settle within ${STEP_MS} ms for ${file}`);
}

async function overlayInstance(page) {
  const text = await page.locator('[data-cy="viewport-overlay-bottom-right"]').first().innerText();
  const match = /I:\s*(\d+)\s*\((\d+)\/(\d+)\)/.exec(text);
  return match ? { instance: Number(match[1]), index: Number(match[2]), count: Number(match[3]), text } : null;
}

async function waitForInstance(page, instance, timeout) {
  try {
    await page.waitForFunction(
      n => new RegExp(`I:\\s*${n}\\s*\\(`).test(
        document.querySelector('[data-cy="viewport-overlay-bottom-right"]')?.innerText || ''),
      instance,
      { timeout },
    );
    return true;
  } catch {
    return false;
  }
}

async function scrollTo(page, instance) {
  // One ArrowDown tells how InstanceNumber moves with the index; then press as many keys as it takes,
  // and check the overlay. Step by step when the numbering is not one per image.
  let now = await overlayInstance(page);
  if (now && now.instance === instance) return now;
  await page.keyboard.press('ArrowDown');
  await page.waitForFunction(
    before => (document.querySelector('[data-cy="viewport-overlay-bottom-right"]')?.innerText || '') !== before,
    now ? now.text : '',
  ).catch(() => {});
  const after = await overlayInstance(page);
  const step = now && after && after.instance !== now.instance ? Math.sign(after.instance - now.instance) : 1;
  now = after;
  const deadline = Date.now() + STEP_MS;
  while (now && now.instance !== instance && Date.now() < deadline) {
    const presses = Math.round((instance - now.instance) / step);
    const key = presses > 0 ? 'ArrowDown' : 'ArrowUp';
    for (let i = 0; i < Math.abs(presses); i++) await page.keyboard.press(key);
    if (await waitForInstance(page, instance, 5000)) return overlayInstance(page);
    now = await overlayInstance(page);
  }
  if (now && now.instance === instance) return now;
  throw new Error(`could not scroll to InstanceNumber ${instance}; overlay shows ${JSON.stringify(now)}`);
}

let page = null;
try {
  // A small laptop's screen: SwiftShader renders every pixel of the WebGL viewport on the CPU, and a
  // screenshot of it costs about 1 s here against 2.2 s at 1280 x 800; the source image is still drawn
  // larger than its own pixels (1.6 screen pixels per pixel for the demo's 240 x 240 slices).
  page = await browser.newPage({ viewport: { width: 960, height: 600 } });
  page.setDefaultTimeout(STEP_MS);
  // The first-visit guided tour would cover the viewport.
  await page.addInitScript(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));
  page.on('pageerror', e => report.pageErrors.push(e.message.slice(0, 500)));
  page.on('response', r => {
    if (r.status() >= 400 && report.failedRequests.length < 20) {
      report.failedRequests.push(`${r.status()} ${r.request().method()} ${r.url().slice(0, 300)}`);
    }
  });
  page.on('console', m => {
    if (m.type() === 'error') report.consoleErrors.push(m.text().slice(0, 500));
    if (m.type() === 'warning' && /SCOORD|\bSR\b|structured report/i.test(m.text())) {
      report.srWarnings.push(m.text().slice(0, 500));
    }
  });

  await page.goto(`${viewerUrl}/viewer?StudyInstanceUIDs=${studyUid}`);
  const thumbnail = modality => page.locator('[data-cy="study-browser-thumbnail-no-image"]').filter({
    has: page.locator('[data-cy="series-modality-label"]', { hasText: new RegExp(`^${modality}$`) }),
  });
  const segThumb = thumbnail('SEG');
  await segThumb.first().waitFor();
  await page.locator('[data-cy="viewport-overlay-bottom-right"]').first().waitFor();
  mark('study_shown');

  await segThumb.first().dblclick();
  await page.getByText('Do you want to open this Segmentation?').waitFor();
  await page.getByRole('button', { name: 'Yes' }).click();
  await page.locator('[data-cy="panelSegmentation-btn"]').click();
  const panel = page.locator('#viewerLayoutResizableRightPanel');
  await panel.getByText('Segmentations').first().waitFor();
  await page.waitForFunction(
    () => (document.querySelector('#viewerLayoutResizableRightPanel')?.innerText || '').split('\n').length > 2,
  );
  report.segmentationPanel = await panel.innerText();
  mark('segmentation_loaded');

  const viewport = page.locator('[data-cy="viewport-pane"]').first();
  for (const instance of instances.map(Number)) {
    const overlay = await scrollTo(page, instance);
    const png = path.join(outDir, `instance-${instance}.png`);
    await stableShot(page, viewport, png);
    report.slices.push({ instance, overlay, png, clip: await viewport.boundingBox() });
  }
  mark('slices_shot');
  // The whole page on the last requested slice.
  await page.screenshot({ path: path.join(outDir, 'page-seg.png') });

  if (!flags.has('--no-sr')) {
    // OHIF's DICOM Tag Browser on the SR series, searched for NumericValue: what OHIF read from the SR.
    await page.locator('[data-cy="MoreTools-split-button-secondary"]').click();
    await page.getByText('DICOM Tag Browser', { exact: true }).click();
    const dialog = page.getByRole('dialog');
    await dialog.getByRole('combobox').first().click();
    await page.getByRole('option', { name: /\(SR\)/ }).click();
    await dialog.getByPlaceholder('Search metadata').fill('NumericValue');
    await dialog.getByText('NumericValue', { exact: true }).first().waitFor();
    await stableShot(page, dialog, path.join(outDir, 'dialog-sr-tags.png'));
    await page.screenshot({ path: path.join(outDir, 'page-sr-tags.png') });
    report.srTagBrowser = await dialog.innerText();
    mark('sr_tag_browser');
    // Escape, as a reader closes it: on this screen the dialog's Close button lies below the page's edge.
    await page.keyboard.press('Escape');
    await dialog.waitFor({ state: 'detached' });

    const srThumb = thumbnail('SR');
    await srThumb.first().dblclick();
    await page.locator('[data-cy="trackedMeasurements-btn"]').click();
    await panel.getByText('Measurements').first().waitFor();
    await stableShot(page, viewport, path.join(outDir, 'viewport-sr.png'));
    await page.screenshot({ path: path.join(outDir, 'page-sr.png') });
    report.srViewport = await viewport.innerText();
    report.measurementPanel = await panel.innerText();
    mark('sr_opened');
  }
} catch (err) {
  report.error = String(err && err.stack ? err.stack : err).slice(0, 2000);
  if (page) await page.screenshot({ path: path.join(outDir, 'page-error.png') }).catch(() => {});
} finally {
  fs.writeFileSync(path.join(outDir, 'report.json'), JSON.stringify(report, null, 2));
  await browser.close();
}
process.exit(report.error ? 1 : 0);
