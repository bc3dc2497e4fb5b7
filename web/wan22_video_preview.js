// The MP4 of Wan22SaveVideo, played under the node on the 2024 ComfyUI frontend (scripts/app.js, before the Vue
// frontend). The node's ui output is {images: [{filename, subfolder, type: "output", format: "video/h264-mp4"}],
// animated: [true]}; that frontend loads every output into an <img> (new Image() in onDrawBackground), the MP4 fails
// to load there and nothing is drawn. Here the node shows a <video> (autoplay, loop, muted, controls) as a DOM widget
// instead, sized to the video's aspect ratio, replaced when the node runs again (removed with the node). The newer
// frontend (ComfyUI >= 0.3.x) plays such outputs itself (its "video-preview" widget) and is left alone: only the old
// image-only preview is detected, so there is never a second player.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const WIDGET = "wan22_video_preview";
const MARGIN = 10; // the 2024 DOM widget's margin on each side (scripts/domWidget.js)

// The 2024 onDrawBackground: outputs become `new Image()`s, `animatedImages` only switches <img> for the canvas.
function oldImageOnlyPreview(node) {
	const draw = String(node.onDrawBackground || "");
	return /new Image\(\)/.test(draw) && /animatedImages/.test(draw) && !/video/i.test(draw);
}

function videoOutputs(output) {
	return (output?.images || []).filter((e) => e?.filename && String(e.format || "").startsWith("video/"));
}

function viewURL(entry) {
	const params = { filename: entry.filename, subfolder: entry.subfolder ?? "", type: entry.type ?? "output" };
	if (entry.format) params.format = entry.format;
	return api.apiURL("/view?" + new URLSearchParams(params));
}

function removePreview(node) {
	const i = node.widgets?.findIndex((w) => w.name === WIDGET) ?? -1;
	if (i < 0) return;
	node.widgets[i].onRemove?.();
	node.widgets.splice(i, 1);
}

function showPreview(node, entry) {
	let widget = node.widgets?.find((w) => w.name === WIDGET);
	if (!widget) {
		const container = document.createElement("div");
		Object.assign(container.style, { display: "flex", alignItems: "center", justifyContent: "center" });
		const state = { aspect: 9 / 16 }; // height / width until the video's own size is known
		const height = () => Math.round(Math.max(0, node.size[0] - 2 * MARGIN) * state.aspect) + 2 * MARGIN;
		widget = node.addDOMWidget(WIDGET, "video", container, {
			getHeight: height,
			getMinHeight: height,
			hideOnZoom: false,
		});
		widget.state = state;
		widget.serializeValue = () => undefined; // nothing of it goes into the workflow or the prompt
	}
	const video = document.createElement("video");
	Object.assign(video, { autoplay: true, loop: true, muted: true, controls: true, playsInline: true });
	Object.assign(video.style, { width: "100%", height: "100%", objectFit: "contain", display: "block" });
	video.addEventListener("loadedmetadata", () => {
		if (video.videoWidth > 0 && video.videoHeight > 0) {
			widget.state.aspect = video.videoHeight / video.videoWidth;
			fit(node);
		}
	});
	video.src = viewURL(entry);
	for (const old of widget.element.querySelectorAll("video")) {
		old.pause();
		old.removeAttribute("src"); // the replaced player lets go of its file instead of looping on, detached
		old.load();
	}
	widget.element.replaceChildren(video);
	fit(node);
}

// The node as tall as its widgets plus the video: the DOM widget's onResize grows it to fit.
function fit(node) {
	node.setSize([node.size[0], node.computeSize()[1]]);
	app.graph.setDirtyCanvas(true, true);
}

app.registerExtension({
	name: "wan22.VideoPreview",
	nodeCreated(node) {
		if ((node.comfyClass || node.type) !== "Wan22SaveVideo") return;
		if (!oldImageOnlyPreview(node) || typeof node.addDOMWidget !== "function") return;
		const onExecuted = node.onExecuted;
		node.onExecuted = function (output) {
			const result = onExecuted?.apply(this, arguments);
			const outputs = app.nodeOutputs?.[this.id + ""] ?? output;
			const videos = videoOutputs(outputs);
			if (!videos.length) {
				removePreview(this);
				return result;
			}
			// Claimed: the old onDrawBackground loads output.images only when they change, so it does not try
			// (and fail) to show the MP4 as an <img>, nor reserve the 220 px of an image preview.
			this.images = outputs.images;
			this.imgs = null;
			showPreview(this, videos[videos.length - 1]);
			return result;
		};
	},
});
