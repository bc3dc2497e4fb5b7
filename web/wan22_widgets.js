// Integer widgets of the Wan2.2 nodes on the 2024 ComfyUI frontend (scripts/widgets.js, before the Vue frontend).
// That frontend rounds every INT widget's value to a multiple of its step (Math.round(v / s) * s, ignoring min and
// the `round` option), so an input whose valid values are min + k*step (frame_num: 1 + 4k) can never be reached by
// the arrows or by typing: 81 -> 84, 33 -> 32. Here such widgets round to min + k*step instead. The newer frontend
// (ComfyUI >= 0.3.x) already steps from min and is left alone: only the old rounding callback is replaced.
import { app } from "../../scripts/app.js";

const OLD_INT_ROUNDING = /this\.options\.step\s*\/\s*10/;

app.registerExtension({
	name: "wan22.IntWidgetsStepFromMin",
	nodeCreated(node) {
		if (!String(node.comfyClass || node.type || "").startsWith("Wan22")) return;
		for (const w of node.widgets || []) {
			if (w.type !== "number" || typeof w.callback !== "function") continue;
			if (!OLD_INT_ROUNDING.test(String(w.callback))) continue;
			w.callback = function (v) {
				const s = this.options.step / 10;
				const lo = this.options.min ?? 0;
				let x = lo + Math.round((Number(v) - lo) / s) * s;
				if (this.options.max != null && x > this.options.max) x -= s;
				if (x < lo) x = lo;
				this.value = x;
			};
		}
	},
});
