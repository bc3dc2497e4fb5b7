// Titles and descriptions for this pack's workflows in the template browser of ComfyUI's Vue frontend.
// For a custom node pack's example_workflows/<name>.json that frontend (1.27 in ComfyUI 0.3.64, and the later ones)
// reads no metadata: api.getWorkflowTemplates() gives only file names, and each card shows the file name as title
// and again as description, with <name>.jpg from the pack's route as thumbnail. Titles and descriptions are read
// only from the core template index (api.getCoreWorkflowTemplates(), ComfyUI's templates/index.json). So this
// extension moves the pack's names out of the first listing into one more category of the second, with the cards of
// wan22_templates.json (written by `python -m scripts.regenerate`) under the folder the pack is installed in: the
// cards still fetch example_workflows/<name>.json and <name>.jpg from /api/workflow_templates/<folder>/ and stay
// under "Custom Nodes". When anything is not as expected the frontend's own listing is left as it was. The 2024
// frontend has no template browser (no such api methods): nothing changes there.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const INDEX_URL = new URL("./wan22_templates.json", import.meta.url);
let index = null;

function loadIndex() {
	index ??= fetch(INDEX_URL).then((r) => (r.ok ? r.json() : null)).catch(() => null);
	return index;
}

// {module, category} for a listing of custom templates ({folder: [name, ...]}): the folder that holds all of this
// pack's workflows, and the index's category for it (a listed workflow without a card keeps its file name).
async function ours(listing) {
	const categories = await loadIndex();
	const category = Array.isArray(categories) ? categories[0] : null;
	if (!category || !Array.isArray(category.templates) || !listing || typeof listing !== "object") return null;
	const cards = new Map(category.templates.map((t) => [t.name, t]));
	const module = Object.keys(listing).find(
		(m) => Array.isArray(listing[m]) && [...cards.keys()].every((name) => listing[m].includes(name)));
	if (module === undefined) return null;
	const templates = listing[module].map(
		(name) => cards.get(name) ?? { name, description: name, mediaType: "image", mediaSubtype: "jpg" });
	templates.sort((a, b) => (cards.has(a.name) ? 0 : 1) - (cards.has(b.name) ? 0 : 1));
	return { module, category: { ...category, moduleName: module, templates } };
}

app.registerExtension({
	name: "wan22.TemplateCards",
	init() {
		const customTemplates = api.getWorkflowTemplates;
		const coreTemplates = api.getCoreWorkflowTemplates;
		if (typeof customTemplates !== "function" || typeof coreTemplates !== "function") return;
		let moved = null; // what the latest custom listing gave up, for the core index that follows it
		api.getWorkflowTemplates = async function (...args) {
			const listing = await customTemplates.apply(this, args);
			moved = await ours(listing).catch(() => null);
			if (!moved) return listing;
			const rest = { ...listing };
			delete rest[moved.module];
			return rest;
		};
		api.getCoreWorkflowTemplates = async function (...args) {
			const core = await coreTemplates.apply(this, args);
			const found = moved ?? (await customTemplates.call(this).then(ours).catch(() => null));
			return found && Array.isArray(core) ? [...core, found.category] : core;
		};
	},
});
