"""Results in the MRML scene: a text node per volume, kept with the scene, that restores the chat.

The text node holds the readable text (its first line says it is machine-generated and must be
reviewed), and the whole conversation as JSON in an attribute, so that reopening a saved scene
gives the panel back its history, and follow-up questions their context. The volume references
the node (role ``CTMLLMResult``); in the subject hierarchy the node sits beside the volume, under
its study when the volume came from DICOM.

Volumes are told apart by a unique id stored on the node (``VOLUME_UID_ATTRIBUTE``): MRML reuses
node IDs after a scene close, so nothing here is keyed by a node ID.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from CTMLLMSlicerLib.conversation import Conversation

RESULT_REFERENCE_ROLE = "CTMLLMResult"
"""Node reference role from a volume node to the text node holding its report and answers."""
VOLUME_UID_ATTRIBUTE = "CTMLLM.VolumeUID"
CONVERSATION_ATTRIBUTE = "CTMLLM.Conversation"
MODEL_ID_ATTRIBUTE = "CTMLLM.ModelId"
SETTINGS_ATTRIBUTE = "CTMLLM.Settings"


class VolumeIds:
    """Unique ids of the scene's volumes, stored on the nodes and saved with the scene.

    A node copied with its attributes (cloned) would share its original's id: the first node
    seen with an id owns it, and a second node still in the scene with the same id gets a new one.
    """

    def __init__(self, scene: Any) -> None:
        self.scene = scene
        self._owners: dict[str, str] = {}

    def get(self, node: Any, assign: bool = True) -> str | None:
        """The node's id; a new one is stored on it when it has none (unless ``assign`` is False)."""
        uid = node.GetAttribute(VOLUME_UID_ATTRIBUTE) or ""
        if uid:
            owner = self._owners.setdefault(uid, node.GetID())
            ownerNode = self.scene.GetNodeByID(owner) if self.scene is not None and owner else None
            if (
                owner == node.GetID()
                or ownerNode is None
                or ownerNode.GetAttribute(VOLUME_UID_ATTRIBUTE) != uid
            ):
                self._owners[uid] = node.GetID()
                return uid
        if not assign:
            return None
        uid = uuid.uuid4().hex
        node.SetAttribute(VOLUME_UID_ATTRIBUTE, uid)
        self._owners[uid] = node.GetID()
        return uid

    def forget(self, uid: str | None = None) -> None:
        """Forget one id's owner (its node was removed), or all (the scene was closed)."""
        if uid is None:
            self._owners.clear()
        else:
            self._owners.pop(uid, None)


def resultTextNode(volumeNode: Any) -> Any:
    """The text node holding ``volumeNode``'s results, or None."""
    return volumeNode.GetNodeReference(RESULT_REFERENCE_ROLE)


def storedConversation(volumeNode: Any) -> Conversation | None:
    """The conversation saved with the scene in the volume's result node, or None."""
    textNode = resultTextNode(volumeNode)
    stored = textNode.GetAttribute(CONVERSATION_ATTRIBUTE) if textNode is not None else None
    if not stored:
        return None
    try:
        return Conversation.fromJSON(stored)
    except (ValueError, TypeError):
        return None  # written by something else: the text stays, the panel starts a new conversation


def writeResultTextNode(scene: Any, volumeNode: Any, conversation: Conversation | None, text: str) -> Any:
    """Create or update the volume's result text node with ``text`` and the conversation."""
    textNode = resultTextNode(volumeNode)
    if textNode is None:
        textNode = scene.AddNewNodeByClass("vtkMRMLTextNode", f"{volumeNode.GetName()} CT-MLLM report")
        volumeNode.SetNodeReferenceID(RESULT_REFERENCE_ROLE, textNode.GetID())
    textNode.SetText(text)
    if conversation is not None:
        textNode.SetAttribute(MODEL_ID_ATTRIBUTE, conversation.modelId)
        textNode.SetAttribute(SETTINGS_ATTRIBUTE, json.dumps(conversation.settings, sort_keys=True))
        textNode.SetAttribute(CONVERSATION_ATTRIBUTE, json.dumps(conversation.toDict(), ensure_ascii=False))
    placeBesideVolume(scene, volumeNode, textNode)
    return textNode


def placeBesideVolume(scene: Any, volumeNode: Any, node: Any) -> None:
    """Put ``node`` in the subject hierarchy under the volume's parent item (its study)."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if hierarchy is None:
        return
    volumeItem = hierarchy.GetItemByDataNode(volumeNode)
    if not volumeItem:
        volumeItem = hierarchy.CreateItem(hierarchy.GetSceneItemID(), volumeNode)
    parent = hierarchy.GetItemParent(volumeItem)
    item = hierarchy.GetItemByDataNode(node)
    if not item:
        hierarchy.CreateItem(parent, node)
    elif hierarchy.GetItemParent(item) != parent:
        hierarchy.SetItemParent(item, parent)
